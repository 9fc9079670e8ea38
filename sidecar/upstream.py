"""The engine side of the proxy: one ClientSession per app, forwarding, streaming, and the ack.

The ack is the moment a multimodal request stops needing its slot:
- a streamed answer: its first body chunk (engines answer headers before their own preprocessing;
  the first chunk comes after prefill started);
- a stream the sidecar asked for on the client's behalf (`stream_upgrade`): the same first chunk,
  then the SSE stream is re-assembled into the JSON answer the client asked for;
- anything else (a plain JSON answer, an error): the complete answer.
The lease is released at the ack or, exactly once, on any other ending (see `gate.Lease`).

A translated answer (offload mode: the engine speaks chat, the client Anthropic or Responses) comes back
in the client's API, errors included: an engine error status keeps its status and message in the client's
error shape; a failure after the stream began is an error event in the client's stream grammar.

Bytes are passed through as they arrive: no buffering of SSE, hop-by-hop headers dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
import aiohttp.payload
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .assemble import Kind, StreamError, assembler_for
from .config import UpstreamConfig
from .errors import Cause, SidecarError
from .families import Family, error_event
from .gate import Lease
from .metrics import Metrics
from .sse import SSEParser
from .translate import StreamTranslator

log = logging.getLogger("mm_sidecar.upstream")

# RFC 9110 7.6.1 hop-by-hop headers, plus those aiohttp computes itself on each side.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
# aiohttp decompresses upstream bodies and writes its own Server/Date: never copy those back.
_RESPONSE_DROP = _HOP_BY_HOP | {"content-encoding", "server", "date"}
_REQUEST_DROP = _HOP_BY_HOP | {"accept-encoding", "expect"}
# The request codings aiohttp's server decodes before a handler reads the body (its parser's own list;
# a coding it cannot decode, such as br without Brotli, is refused with 400 before any handler runs).
_SERVER_DECODED = frozenset(("gzip", "deflate", "br", "zstd"))


def request_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The client's headers for the engine. Every body we forward is one we read from `request.content`,
    already decoded; the engine must not decode it again, so a coding the server decoded is dropped.
    Content-Length goes too: the client computes it from the bytes actually sent."""
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _REQUEST_DROP)
    for name in _connection_listed(headers):
        out.popall(name, None)
    codings = headers.getall("Content-Encoding", [])
    # One coding, as aiohttp reads it (an ASCII token, any case); anything else it left undecoded.
    if len(codings) == 1 and codings[0].isascii() and codings[0].strip().lower() in _SERVER_DECODED:
        out.popall("Content-Encoding")
    out["x-request-id"] = request_id
    return out


def response_headers(headers: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _RESPONSE_DROP)
    for name in _connection_listed(headers):
        out.popall(name, None)
    out["x-request-id"] = request_id
    return out


def _whole(resp: aiohttp.ClientResponse, fwd: Forward, body: bytes) -> web.Response:
    """The engine's whole answer, in hand: one response with a Content-Length, headers and body in one
    write (not headers, a chunk and the chunked terminator in three). Nothing waits: no bytes are pending."""
    return web.Response(status=resp.status, body=body, headers=response_headers(resp.headers, fwd.request_id))


def _connection_listed(headers: CIMultiDictProxy[str]) -> list[str]:
    """Headers named in `Connection:` are hop-by-hop too (RFC 9110 7.6.1)."""
    return [t.strip() for v in headers.getall("Connection", []) for t in v.split(",") if t.strip()]


def _is_sse(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"


Piece = bytes | memoryview
Body = bytes | memoryview | tuple[Piece, ...]  # pieces: hollow.Texts.encode's runs left in the client's buffer
_SLICE = 1 << 18


class PiecesPayload(aiohttp.payload.Payload):
    """A request body sent as its pieces, a slice at a time, with its Content-Length.

    Slices, not one write: the transport copies whatever the socket does not take at once into
    its buffer, and a 25 MiB body written whole was a ~2 ms copy on the loop; written in slices,
    each waits for the socket to drain, so nothing is copied but the slice in hand.
    """

    def __init__(self, pieces: tuple[Piece, ...]) -> None:
        # aiohttp's type for bytes: the client's own Content-Type, forwarded, takes precedence.
        super().__init__(pieces, content_type="application/octet-stream")
        self._pieces = pieces
        self._nbytes = sum(len(p) for p in pieces)
        self._size = self._nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._pieces).decode(encoding, errors)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None) -> None:
        left = self._nbytes if content_length is None else min(content_length, self._nbytes)
        for piece in self._pieces:
            for start in range(0, len(piece), _SLICE):
                if left <= 0:
                    return
                chunk = piece[start : start + min(_SLICE, left)]
                await writer.write(chunk)
                left -= len(chunk)


def _payload(body: Body) -> bytes | memoryview | PiecesPayload:
    if isinstance(body, tuple):
        return PiecesPayload(body)
    return PiecesPayload((body,)) if len(body) > _SLICE else body


@dataclass(frozen=True, slots=True)
class Forward:
    """One request to send to the engine, and how to treat its answer."""

    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: Body
    family: Family
    request_id: str
    lease: Lease | None = None  # multimodal: released at the ack
    # Set when the sidecar upgraded a non-streaming request; with `transform` too (offload into vLLM),
    # the assembled chat answer is then translated back with `transform.whole`.
    assemble: Kind | None = None
    # "headers": the engine's response headers are the ack (offload: it sends them only after
    # every rank copied its tensors); "first_chunk": the passthrough rules in the module docstring.
    ack: Literal["first_chunk", "headers"] = "first_chunk"
    transform: ResponseTransform | None = None  # a chat answer translated back to the client's API


class ResponseTransform(Protocol):
    """Turns the engine's chat-completions answer into the client's API (Anthropic, Responses)."""

    def stream(self) -> StreamTranslator: ...

    def whole(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def error(self, status: int, payload: Any) -> dict[str, Any]:
        """The engine's error answer (`payload`: its JSON, or its text) as the client API's error body."""
        ...


def _logged(fwd: Forward, cause: Cause, message: str) -> SidecarError:
    """The engine failed this request (gone, crashed, stalled): one log line per request, because the
    operator sees nothing else of it (the client got a 5xx or an in-band error event)."""
    log.warning("%s %r (request %s): %s", fwd.method, fwd.path_qs[:200], fwd.request_id, message)
    return SidecarError(cause, message)


class Upstream:
    """The engine's address and the one ClientSession used to reach it."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        parts = urlsplit(config.url)
        connector: aiohttp.BaseConnector
        if parts.scheme == "unix":
            connector = aiohttp.UnixConnector(path=parts.path, limit=config.max_connections)
            self.base = "http://localhost"
        else:
            connector = aiohttp.TCPConnector(limit=config.max_connections, enable_cleanup_closed=True)
            self.base = config.url.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
            ),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        await self.session.close()

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            async with self.session.get(
                self.base + self.config.health_path, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                await resp.read()
                return resp.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    # -- forwarding ------------------------------------------------------------------------
    def _ack_timeout(self) -> SidecarError:
        return SidecarError(
            Cause.UPSTREAM_TIMEOUT,
            f"the engine did not accept the request within upstream.ack_timeout_s={self.config.ack_timeout_s:g}",
        )

    @contextlib.asynccontextmanager
    async def _open(self, fwd: Forward, deadline: float | None) -> AsyncIterator[aiohttp.ClientResponse]:
        """The engine's response (headers read); `deadline` bounds the wait for them (loop time)."""
        try:
            # Text has no deadline: skip the timeout's bookkeeping on its path.
            async with asyncio.timeout_at(deadline) if deadline is not None else contextlib.nullcontext():
                # encoded=True: the path goes to the engine exactly as the client sent it (yarl would
                # otherwise decode %2e%2e and resolve it, turning /v1/files/%2e%2e/admin into /v1/admin).
                url = URL(self.base + fwd.path_qs, encoded=True)
                resp = await self.session.request(
                    fwd.method, url, data=_payload(fwd.body), headers=fwd.headers, allow_redirects=False
                )
        except aiohttp.ClientConnectorError as exc:
            self.metrics.upstream_status(None)
            raise _logged(fwd, Cause.UPSTREAM_UNAVAILABLE, f"cannot connect to the engine: {exc.os_error}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            self.metrics.upstream_status(None)
            raise _logged(fwd, Cause.UPSTREAM_UNAVAILABLE, f"the engine closed the connection: {exc}") from exc
        except TimeoutError as exc:  # our deadline or aiohttp's connect timeout
            self.metrics.upstream_status(None)
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                error = self._ack_timeout()
                raise _logged(fwd, error.cause, error.message) from exc
            raise _logged(fwd, Cause.UPSTREAM_TIMEOUT, f"the engine did not answer in time: {exc}") from exc
        self.metrics.upstream_status(resp.status)
        try:
            yield resp
        finally:
            # An unfinished body closes the connection, so the engine sees the abort.
            resp.release()

    async def forward(self, request: web.Request, fwd: Forward) -> web.StreamResponse:
        """Send `fwd` to the engine and answer the client; releases `fwd.lease` at the ack."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.ack_timeout_s if fwd.lease is not None else None
        async with self._open(fwd, deadline) as resp:
            if fwd.lease is not None and fwd.ack == "headers" and fwd.lease.release():
                self.metrics.ack_latency.observe(loop.time() - started)
            try:
                if fwd.lease is not None and not fwd.lease.released:
                    first = await self._until_ack(resp, fwd, started)
                else:
                    first = await resp.content.readany()
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                raise _logged(fwd, Cause.UPSTREAM_BAD_RESPONSE, f"the engine broke off its answer: {exc}") from exc
            if fwd.transform is not None and resp.status >= 400:
                return await self._translated_error(resp, fwd, fwd.transform, first)
            if isinstance(first, _Whole):
                return _whole(resp, fwd, first.body)
            if fwd.transform is None and not _is_sse(resp) and resp.content.at_eof():
                return _whole(resp, fwd, first)  # a short answer that came in one read
            if fwd.assemble is not None and resp.status == 200 and _is_sse(resp):
                return await self._assembled(resp, fwd, first)
            if fwd.transform is not None and resp.status == 200:
                return await self._translated(request, resp, fwd, fwd.transform, first)
            return await self._stream(request, resp, fwd, first)

    async def _until_ack(self, resp: aiohttp.ClientResponse, fwd: Forward, started: float) -> bytes | _Whole:
        """Wait for the ack within `ack_timeout_s` (counted from forwarding), then release the lease."""
        assert fwd.lease is not None  # the caller checked
        try:
            async with asyncio.timeout_at(started + self.config.ack_timeout_s):
                if _is_sse(resp):
                    first: bytes | _Whole = await resp.content.readany()
                else:
                    first = _Whole(await resp.read())
        except TimeoutError:
            raise self._ack_timeout() from None
        if fwd.lease.release():
            self.metrics.ack_latency.observe(asyncio.get_running_loop().time() - started)
        return first

    async def _stream(
        self, request: web.Request, resp: aiohttp.ClientResponse, fwd: Forward, first: bytes
    ) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, headers=response_headers(resp.headers, fwd.request_id))
        sse = _is_sse(resp)
        if sse:
            out.headers["X-Accel-Buffering"] = "no"
            out.headers["Cache-Control"] = "no-cache"
        await out.prepare(request)
        if first:
            await out.write(first)
        try:
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # Status already sent: report in-band, as the engines themselves do.
            error = _logged(fwd, Cause.UPSTREAM_BAD_RESPONSE, f"the engine broke off the stream: {exc}")
            if sse:
                with contextlib.suppress(ConnectionError):
                    await out.write(error_event(fwd.family, error))
            self.metrics.upstream_status(None)
        except TimeoutError:
            if sse:
                error = SidecarError(
                    Cause.UPSTREAM_TIMEOUT, "the engine went silent longer than upstream.read_timeout_s"
                )
                with contextlib.suppress(ConnectionError):
                    await out.write(error_event(fwd.family, error))
        await out.write_eof()
        return out

    async def _assembled(self, resp: aiohttp.ClientResponse, fwd: Forward, first: bytes) -> web.Response:
        assert fwd.assemble is not None  # the caller checked
        parser = SSEParser()
        assembler = assembler_for(fwd.assemble, self.config.engine)
        try:
            for event in parser.feed(first):
                assembler.add(event)
            async for chunk in resp.content.iter_any():
                for event in parser.feed(chunk):
                    assembler.add(event)
            for event in parser.close():
                assembler.add(event)
            result: dict[str, Any] = assembler.result()
            if fwd.transform is not None:
                result = fwd.transform.whole(result)
        except StreamError as exc:
            raise SidecarError(Cause.UPSTREAM_BAD_RESPONSE, f"the engine's answer failed: {exc}") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise _logged(fwd, Cause.UPSTREAM_BAD_RESPONSE, f"the engine broke off its answer: {exc}") from exc
        except TimeoutError as exc:
            raise SidecarError(
                Cause.UPSTREAM_TIMEOUT, "the engine went silent longer than upstream.read_timeout_s"
            ) from exc
        except (ValueError, TypeError, KeyError) as exc:  # the translation of an assembled answer
            raise SidecarError(Cause.UPSTREAM_BAD_RESPONSE, f"cannot translate the engine's answer: {exc}") from exc
        headers = response_headers(resp.headers, fwd.request_id)
        headers.popall("Content-Type", None)
        headers.popall("Cache-Control", None)
        return web.Response(status=200, body=orjson.dumps(result), content_type="application/json", headers=headers)

    async def _translated(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        fwd: Forward,
        transform: ResponseTransform,
        first: bytes,
    ) -> web.StreamResponse:
        headers = response_headers(resp.headers, fwd.request_id)
        headers.popall("Content-Type", None)
        if not _is_sse(resp):
            try:
                body = orjson.loads(first + await resp.read())
                out = transform.whole(body)
            except (orjson.JSONDecodeError, aiohttp.ClientError, ValueError, TypeError, KeyError) as exc:
                raise SidecarError(Cause.UPSTREAM_BAD_RESPONSE, f"cannot translate the engine's answer: {exc}") from exc
            except TimeoutError as exc:  # aiohttp's read timeout is a ClientError only on some versions
                raise SidecarError(
                    Cause.UPSTREAM_TIMEOUT, "the engine went silent longer than upstream.read_timeout_s"
                ) from exc
            return web.Response(body=orjson.dumps(out), content_type="application/json", headers=headers)
        stream = web.StreamResponse(headers=headers)
        stream.content_type = "text/event-stream"
        stream.headers["X-Accel-Buffering"] = "no"
        stream.headers["Cache-Control"] = "no-cache"
        await stream.prepare(request)
        parser, translator = SSEParser(), transform.stream()
        try:
            chunk = first
            while chunk:
                for event in parser.feed(chunk):
                    for frame in translator.feed(event):
                        await stream.write(frame)
                chunk = await resp.content.readany()
            for event in parser.close():
                for frame in translator.feed(event):
                    await stream.write(frame)
            for frame in translator.finish():
                await stream.write(frame)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # Status already sent: in-band, in the client's grammar (not `error_event`'s chat form).
            error = _logged(fwd, Cause.UPSTREAM_BAD_RESPONSE, f"the engine broke off the stream: {exc}")
            await _write_quietly(stream, translator.fail(error))
            self.metrics.upstream_status(None)
        except TimeoutError:
            error = SidecarError(Cause.UPSTREAM_TIMEOUT, "the engine went silent longer than upstream.read_timeout_s")
            await _write_quietly(stream, translator.fail(error))
        await stream.write_eof()
        return stream

    async def _translated_error(
        self, resp: aiohttp.ClientResponse, fwd: Forward, transform: ResponseTransform, first: bytes | _Whole
    ) -> web.Response:
        """The engine refused or failed a translated request: its status and message, in the client's error
        shape (a chat `{"error": ...}` body is not what an Anthropic SDK parses). Streamed or not, nothing
        has been sent yet, so the client gets the real status, not an in-band event."""
        try:
            raw = first.body if isinstance(first, _Whole) else first + await resp.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise SidecarError(Cause.UPSTREAM_BAD_RESPONSE, f"the engine broke off its answer: {exc}") from exc
        except TimeoutError as exc:
            raise SidecarError(
                Cause.UPSTREAM_TIMEOUT, "the engine went silent longer than upstream.read_timeout_s"
            ) from exc
        payload: Any
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # Not JSON (a proxy's HTML page, a bare "Internal Server Error"): its text is the message.
            payload = raw[:_ERROR_TEXT_MAX].decode(errors="replace").strip()
        headers = response_headers(resp.headers, fwd.request_id)
        headers.popall("Content-Type", None)  # Retry-After and the like are kept
        body = orjson.dumps(transform.error(resp.status, payload))
        return web.Response(status=resp.status, body=body, content_type="application/json", headers=headers)


# An error answer that is not JSON is quoted in the client's error message up to this many bytes.
_ERROR_TEXT_MAX = 2048


async def _write_quietly(stream: web.StreamResponse, frames: list[bytes]) -> None:
    """Write the closing frames of a stream whose client may already be gone."""
    with contextlib.suppress(ConnectionError):
        for frame in frames:
            await stream.write(frame)


@dataclass(frozen=True, slots=True)
class _Whole:
    """A complete non-streamed answer, read before the ack."""

    body: bytes
