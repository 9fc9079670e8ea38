"""Client connections: how long one may take to send its request headers, and how long it may idle.

aiohttp bounds an idle keep-alive connection (`keepalive_timeout`) but not the time a client takes to
send a request's headers: a client that trickles header bytes (slowloris) holds a connection, and the
parser's buffer, until the keep-alive deadline (aiohttp's default: an hour). So the server's protocol
is aiohttp's `RequestHandler` plus a header clock:

    connection opened ─┐                      ┌─ the request's body ends (or it had none)
                       v                      v
            [clock runs: no headers yet]  ... request handled ...  [idle: keep-alive clock only]
                       │ headers complete: clock stops                 │ first byte of the next request
                       v                                               v
                 the request is handled                          [clock runs again]

- The clock starts when the connection opens, and again at the first byte of each later request
  (a connection idling between requests is `server.keepalive_timeout_s`'s, not the clock's).
- It stops when the parser has read a whole request line and headers. Body bytes never start it:
  a slow body is `server.body_timeout_s`'s, enforced by the body reader (`bodies.py`) with a 408 in
  the API's own error shape. (The parser does not say whether a packet that ends one request's body
  also holds the start of the next, so such a pipelined request starts its clock at its next packet;
  one that never sends another is closed at the keep-alive deadline.)
- When it runs out on an idle connection (no request being handled, so no response being written),
  the client gets a plain `408 Request Timeout` and the connection closes; when a request is being
  handled (the slow request is pipelined behind it), that response finishes untouched and the
  connection closes after it.

Why a subclass: aiohttp has no hook between "bytes arrived" and "headers parsed" other than the
protocol's `data_received`, and `web.Server` builds a plain `RequestHandler` per connection. So
`SidecarRunner` rebuilds the `Server` that `AppRunner` made (same handler, request factory and
handler arguments) as one that builds `_Connection`s. The subclass reads a few private attributes of
`RequestHandler` (`_request_count`, `_messages`, `_waiter`, ...), as aiohttp 3.14 names them;
`tests/test_connections.py` pins the behaviour, so an aiohttp upgrade that moves them fails there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from .app_keys import METRICS
from .config import ServerConfig
from .errors import Cause

log = logging.getLogger("mm_sidecar")


def make_runner(app: web.Application, server: ServerConfig) -> web.AppRunner:
    """The runner `serve()` listens with (tests listen with it too, on port 0)."""
    # handler_cancellation: a client that disconnects cancels its handler, which releases its lease
    # or leaves the queue at once instead of holding a slot for a reader who is gone.
    return SidecarRunner(
        app,
        header_timeout_s=server.header_timeout_s,
        keepalive_timeout=server.keepalive_timeout_s,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
    )


class SidecarRunner(web.AppRunner):
    """An `AppRunner` whose connections time out their request headers (module docstring)."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        stock = await super()._make_server()  # runs the app's startup (cleanup_ctx) and freezes it
        counter = self.app[METRICS].rejections.labels(Cause.HEADER_TIMEOUT.code)
        return _Server(
            stock.request_handler,
            request_factory=stock.request_factory,
            handler_cancellation=stock.handler_cancellation,
            header_timeout_s=self._header_timeout_s,
            on_header_timeout=counter.inc,
            # What the app put together for each RequestHandler (keepalive_timeout, access log, debug,
            # handler_args): aiohttp keeps it as `Server._kwargs`.
            **stock._kwargs,
        )


class _Server(web.Server):
    def __init__(
        self, handler: Any, *, header_timeout_s: float, on_header_timeout: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._on_header_timeout = on_header_timeout
        self._connection_loop = kwargs.get("loop") or asyncio.get_running_loop()
        self._connection_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("request_factory", "handler_cancellation", "loop")
        }

    def __call__(self) -> RequestHandler:
        return _Connection(
            self,
            loop=self._connection_loop,
            header_timeout_s=self._header_timeout_s,
            on_header_timeout=self._on_header_timeout,
            **self._connection_kwargs,
        )


class _Connection(RequestHandler):
    __slots__ = ("_header_clock", "_header_timeout_s", "_last_body", "_on_header_timeout")

    def __init__(
        self, manager: web.Server, *, header_timeout_s: float, on_header_timeout: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._on_header_timeout = on_header_timeout
        self._header_clock: asyncio.TimerHandle | None = None
        # The body of the latest request whose headers arrived: bytes while it is unfinished are its body.
        self._last_body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_clock()

    def data_received(self, data: bytes) -> None:
        if self._header_clock is None and data and not (self._close or self._force_close or self._in_body()):
            self._start_clock()  # the first byte of a request
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            # A whole request line and headers parsed (or a parse error, which aiohttp answers with 400):
            # the parsed messages are still queued (the handler task runs after this callback returns).
            self._stop_clock()
            self._last_body = self._messages[-1][1] if self._messages else None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _in_body(self) -> bool:
        if self._upgraded or self._payload_parser is not None:
            return True  # an upgraded connection carries no more requests (the sidecar serves none)
        return self._last_body is not None and not self._last_body.is_eof()

    def _start_clock(self) -> None:
        self._stop_clock()
        self._header_clock = self._loop.call_later(self._header_timeout_s, self._headers_late)

    def _stop_clock(self) -> None:
        if self._header_clock is not None:
            self._header_clock.cancel()
            self._header_clock = None

    def _headers_late(self) -> None:
        self._header_clock = None
        transport = self.transport
        if transport is None or self._force_close or self._close:
            return
        self._on_header_timeout()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Idle: every earlier response is written, so the 408 answers the unfinished request.
            log.debug("closing a connection whose request headers took over %.3g s", self._header_timeout_s)
            transport.write(_request_timeout(self._header_timeout_s))
            self.force_close()  # closes the transport after the 408 is flushed
        else:
            # A response is being written: let it finish, then close instead of reading further requests.
            self.close()


def _request_timeout(timeout_s: float) -> bytes:
    body = f"request headers not received within server.header_timeout_s={timeout_s:g}\n".encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
