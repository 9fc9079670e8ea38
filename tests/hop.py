"""A recording hop: a plain aiohttp proxy between the sidecar and a real engine, observing from outside
the sidecar what the engine was sent and when it answered (the vLLM tier's witness)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiohttp import web


@dataclass
class Exchange:
    path: str
    stream: bool  # the body asked for a stream (the sidecar upgraded it, or the client asked)
    sent: float  # the request's body forwarded to vLLM
    first_byte: float | None = None  # vLLM's first response body byte: it has preprocessed the request
    done: float | None = None
    method: str = "POST"


@dataclass
class RecordingHop:
    """Forwards everything to vLLM unchanged and records, per request, when vLLM got it and when it
    first answered. `max_inside()` is the most multimodal requests vLLM held at once between the two:
    the preprocessing (and prefill) the gate exists to bound."""

    upstream: str
    exchanges: list[Exchange] = field(default_factory=list)
    # While cleared, requests wait here before reaching vLLM: a slow preprocessing, so a test can hold
    # the gate's slot for as long as it needs.
    open: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.open.set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.cleanup_ctx.append(self._session)
        return app

    @property
    def seen(self) -> list[tuple[str, bool]]:
        """(path, asked for a stream) of every POST, in order."""
        return [(e.path, e.stream) for e in self.exchanges if e.method == "POST"]

    async def _session(self, app: web.Application) -> AsyncIterator[None]:
        self.http = aiohttp.ClientSession(auto_decompress=False)
        yield
        await self.http.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        await self.open.wait()
        stream = request.method == "POST" and bool(body) and bool(orjson.loads(body).get("stream"))
        exchange = Exchange(request.path, stream, time.monotonic(), method=request.method)
        self.exchanges.append(exchange)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self.http.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as resp:
            out = web.StreamResponse(status=resp.status)
            for key, value in resp.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    out.headers[key] = value
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                if exchange.first_byte is None:
                    exchange.first_byte = time.monotonic()
                await out.write(chunk)
            exchange.done = time.monotonic()
            await out.write_eof()
            return out

    def max_inside(self) -> int:
        events: list[tuple[float, int]] = []
        for e in self.exchanges:
            end = e.first_byte if e.first_byte is not None else (e.done or time.monotonic())
            events += [(e.sent, 1), (end, -1)]
        inside = peak = 0
        for _, step in sorted(events, key=lambda ev: (ev[0], ev[1])):  # an exit before an entry at a tie
            inside += step
            peak = max(peak, inside)
        return peak
