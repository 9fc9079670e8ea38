"""Connection timeouts (sidecar/connections.py) over real loopback sockets, through the runner `serve()` uses.

A client that trickles its request headers is closed at `server.header_timeout_s` (with a 408 when no
response is being written); an idle keep-alive connection at `server.keepalive_timeout_s`; normal
requests, slow bodies (`server.body_timeout_s`'s business) and long streams are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from sidecar.app import create_app
from sidecar.connections import make_runner
from sidecar.echo import EchoEngine

from .conftest import assert_invariant, chat_body, make_config

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n"


@dataclass
class Listening:
    """A sidecar served by `make_runner` (what `serve()` runs) on a free loopback port."""

    host: str
    port: int

    def make_url(self, path: str) -> URL:
        return URL.build(scheme="http", host=self.host, port=self.port, path=path)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)


ListenFactory = Callable[..., Awaitable[Listening]]


@pytest.fixture
async def listen(aiohttp_server: Any) -> AsyncIterator[ListenFactory]:
    runners: list[tuple[web.AppRunner, Listening]] = []

    async def build(engine: EchoEngine | None = None, **server: Any) -> Listening:
        upstream = await aiohttp_server((engine or EchoEngine()).app())
        config = make_config(str(upstream.make_url("")).rstrip("/"), server=server)
        runner = make_runner(create_app(config), config.server)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append((runner, Listening("127.0.0.1", site.port)))
        return runners[-1][1]

    yield build
    for runner, where in runners:
        try:
            await assert_invariant(where)  # type: ignore[arg-type]  # it only calls make_url
        finally:
            await runner.cleanup()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, every_s: float = 0.02
) -> tuple[bytes, float]:
    """Send `data` a byte at a time until the server answers or closes; then read to EOF. Returns what
    came back and when the connection closed (loop time). Bounded: `data` and the caller's timeout."""
    loop = asyncio.get_running_loop()
    received = b""
    for i in range(len(data)):
        try:
            writer.write(data[i : i + 1])
            await writer.drain()
        except ConnectionError:
            break
        try:
            # Reading between bytes: the client stops writing as soon as the server has spoken.
            received = await asyncio.wait_for(reader.read(65536), every_s)
        except TimeoutError:
            continue
        break
    with contextlib.suppress(ConnectionError):
        received += await reader.read()
    closed_at = loop.time()
    writer.close()
    return received, closed_at


SLOW_HEADERS = b"POST /v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\nX-Pad: " + b"a" * 400


async def test_headers_trickled_from_the_opening_get_408_and_close(listen: ListenFactory) -> None:
    s = await listen(header_timeout_s=0.5, keepalive_timeout_s=5)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        opened = loop.time()
        reader, writer = await s.connect()
        received, closed_at = await trickle(reader, writer, SLOW_HEADERS)  # 8 s of bytes at 20 ms each
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received
    assert b"server.header_timeout_s=0.5" in received
    assert 0.45 <= closed_at - opened < 1.5
    assert await header_timeouts(s) == 1.0  # in mm_sidecar_rejections_total, for the operator


async def header_timeouts(s: Listening) -> float:
    async with aiohttp.ClientSession() as http, http.get(s.make_url("/metrics")) as resp:
        text = await resp.text()
    line = 'mm_sidecar_rejections_total{reason="header_timeout"} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(listen: ListenFactory) -> None:
    s = await listen(header_timeout_s=0.5, keepalive_timeout_s=5)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        opened = loop.time()
        reader, writer = await s.connect()
        received = await reader.read()  # EOF
        elapsed = loop.time() - opened
        writer.close()
    assert received.startswith(b"HTTP/1.1 408 ")
    assert 0.45 <= elapsed < 1.5
    assert await header_timeouts(s) == 1.0


async def test_the_clock_of_a_later_request_starts_at_its_first_byte(listen: ListenFactory) -> None:
    s = await listen(header_timeout_s=0.5, keepalive_timeout_s=5)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        reader, writer = await s.connect()
        writer.write(HEALTHZ)
        head, _ = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        answered = loop.time()
        await asyncio.sleep(0.4)  # idle between requests: the keep-alive deadline's, not the clock's
        first_byte = loop.time()
        received, closed_at = await trickle(reader, writer, SLOW_HEADERS)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert 0.45 <= closed_at - first_byte < 1.5
    assert closed_at - answered >= 0.85  # the clock did not run while the connection idled


async def test_an_idle_keepalive_connection_is_closed_at_the_keepalive_timeout(listen: ListenFactory) -> None:
    s = await listen(header_timeout_s=0.3, keepalive_timeout_s=1.0)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        reader, writer = await s.connect()
        writer.write(HEALTHZ)
        await read_response(reader)
        answered = loop.time()
        received = await reader.read()  # nothing more, then EOF
        idle = loop.time() - answered
        writer.close()
    assert received == b""  # closed quietly: no 408 for a connection that asked for nothing
    assert 0.9 <= idle < 2.0


async def test_normal_requests_on_one_connection_outlive_the_header_timeout(listen: ListenFactory) -> None:
    s = await listen(header_timeout_s=0.3, keepalive_timeout_s=5)
    started = time.monotonic()
    async with asyncio.timeout(10):
        reader, writer = await s.connect()
        for _ in range(6):  # 1.2 s on one connection, 4x the header timeout
            writer.write(HEALTHZ)
            head, _ = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 ")
            await asyncio.sleep(0.2)
        writer.close()
    assert time.monotonic() - started >= 1.2
    async with aiohttp.ClientSession() as http:
        resp = await http.post(s.make_url("/v1/chat/completions"), json=chat_body(image=False))
        assert resp.status == 200
        assert (await resp.json())["object"] == "chat.completion"


def chat_request(body: bytes) -> bytes:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode()


async def send_body_slowly(writer: asyncio.StreamWriter, body: bytes, over_s: float, pieces: int = 12) -> None:
    step = -(-len(body) // pieces)
    for i in range(0, len(body), step):
        writer.write(body[i : i + step])
        await writer.drain()
        await asyncio.sleep(over_s / pieces)


async def test_a_slow_body_is_not_the_header_timeouts_business(listen: ListenFactory) -> None:
    s = await listen(header_timeout_s=0.3, keepalive_timeout_s=5, body_timeout_s=5)
    body = orjson.dumps(chat_body(image=False))
    async with asyncio.timeout(10):
        reader, writer = await s.connect()
        writer.write(chat_request(body))
        await send_body_slowly(writer, body, over_s=1.2)  # 4x the header timeout
        head, answer = await read_response(reader)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head + answer
    assert orjson.loads(answer)["object"] == "chat.completion"


async def test_a_body_slower_than_body_timeout_gets_the_apis_408(listen: ListenFactory) -> None:
    s = await listen(header_timeout_s=0.3, keepalive_timeout_s=5, body_timeout_s=0.8)
    body = orjson.dumps(chat_body(image=False))
    async with asyncio.timeout(10):
        reader, writer = await s.connect()
        writer.write(chat_request(body))
        sender = asyncio.create_task(send_body_slowly(writer, body, over_s=2.4))
        head, answer = await read_response(reader)
        sender.cancel()
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert orjson.loads(answer)["error"]["code"] == "body_timeout"  # the body reader's, in the API's shape


async def test_a_long_stream_outlives_both_timeouts(listen: ListenFactory) -> None:
    s = await listen(EchoEngine(token_s=0.05, tokens=30), header_timeout_s=0.3, keepalive_timeout_s=0.5)
    started = time.monotonic()
    async with aiohttp.ClientSession() as http, asyncio.timeout(10):
        resp = await http.post(s.make_url("/v1/chat/completions"), json=chat_body(image=False, stream=True))
        assert resp.status == 200
        text = (await resp.read()).decode()
    assert time.monotonic() - started >= 1.2  # 30 tokens at 50 ms: longer than both timeouts
    assert text.count("data: {") >= 30 and text.rstrip().endswith("data: [DONE]")


async def test_a_slow_request_pipelined_behind_a_stream_closes_the_connection_after_it(
    listen: ListenFactory,
) -> None:
    s = await listen(EchoEngine(token_s=0.05, tokens=20), header_timeout_s=0.3, keepalive_timeout_s=5)
    body = orjson.dumps(chat_body(image=False, stream=True))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(10):
        reader, writer = await s.connect()
        writer.write(chat_request(body) + body)
        await asyncio.sleep(0.1)
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # the clock runs out mid-stream
        received = await reader.read()  # the whole stream, then EOF
        closed_at = loop.time()
        writer.close()
    assert received.startswith(b"HTTP/1.1 200 ")
    # The stream is whole and nothing follows it: no 408 spliced into a response being written.
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), received[-200:]
    assert b"408" not in received
    assert closed_at - started < 3  # a 1 s stream, then closed: not at the 5 s keep-alive deadline


# -- the event-loop lag sampler, through the same served app -------------------------------------------


def lag_buckets(metrics_text: str) -> dict[float, float]:
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("mm_sidecar_event_loop_lag_seconds_bucket{"):
            labels, _, value = line.rpartition(" ")
            out[float(labels.split('le="', 1)[1].split('"', 1)[0])] = float(value)
    return out


async def test_a_30_ms_stall_of_the_loop_shows_in_the_lag_histogram(listen: ListenFactory) -> None:
    s = await listen()
    async with aiohttp.ClientSession() as http:

        async def above_20_ms() -> float:
            buckets = lag_buckets(await (await http.get(s.make_url("/metrics"))).text())
            assert {0.001, 0.005, 0.02} <= buckets.keys()  # the bounds text-latency targets are read at
            return buckets[float("inf")] - buckets[0.02]

        await asyncio.sleep(0.05)
        before = await above_20_ms()
        await asyncio.sleep(0.05)
        time.sleep(0.03)  # noqa: ASYNC251 - the point: block the loop the sidecar runs on, as a slow walk would
        await asyncio.sleep(0.05)  # the sampler's timer, due during the stall, ran 20-30 ms late
        after = await above_20_ms()
    assert after >= before + 1
