"""The proxy against a real echo upstream on loopback: gating, text isolation, streaming, release paths."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import zlib
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar import bodies
from sidecar.app import create_app
from sidecar.app_keys import BODIES, POOL, STATE, UPSTREAM
from sidecar.echo import EchoEngine

from .conftest import StackFactory, assert_invariant, chat_body, make_config, messages_body


class Holder:
    """A `before_first_chunk` hook that parks requests until released, counting arrivals."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.arrived = 0

    async def __call__(self, request: web.Request, body: dict[str, Any]) -> None:
        self.arrived += 1
        await self.gate.wait()

    async def wait_arrived(self, n: int, limit_s: float = 5.0) -> None:
        async with asyncio.timeout(limit_s):
            while self.arrived < n:
                await asyncio.sleep(0.005)


async def wait_for(cond: Any, limit_s: float = 5.0) -> None:
    async with asyncio.timeout(limit_s):
        while not cond():
            await asyncio.sleep(0.005)


async def test_engine_never_holds_more_multimodal_requests_than_the_gate(stack: StackFactory) -> None:
    engine = EchoEngine(prefill_s=0.02, token_s=0.001)
    s = await stack(engine, gate={"max_concurrent": 2})

    async def one(i: int) -> int:
        body = chat_body(stream=bool(i % 2))
        async with s.client.post("/v1/chat/completions", json=body) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(40)))
    assert statuses == [200] * 40
    assert engine.stats.requests == 40
    # Exactly 2: the gate was the limit, and the test could see a third had the gate let it through.
    assert engine.stats.max_multimodal_held == 2


async def test_text_is_not_delayed_by_a_full_queue(stack: StackFactory) -> None:
    holder = Holder()
    engine = EchoEngine(before_first_chunk=holder)
    s = await stack(engine, gate={"max_concurrent": 1, "max_queue": 2})
    image_tasks = [asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body())) for _ in range(3)]
    await holder.wait_arrived(1)
    await wait_for(lambda: s.app[POOL].stats().queued == 2)

    # Queue full: one more image request is refused at once...
    resp = await s.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 429
    # ...while text requests sail through (the held image requests are still parked upstream).
    engine.before_first_chunk = None  # text must not be parked by the test hook either
    try:
        async with asyncio.timeout(2):
            for stream in (False, True):
                text = await s.client.post("/v1/chat/completions", json=chat_body(image=False, stream=stream))
                assert text.status == 200
                await text.read()
    finally:
        engine.before_first_chunk = holder
    assert not holder.gate.is_set() and s.app[POOL].stats().leases == 1
    holder.gate.set()
    for task in image_tasks:
        r = await task
        assert r.status == 200
        await r.read()


async def test_queue_overflow_gives_429_with_retry_after_in_each_family_shape(stack: StackFactory) -> None:
    holder = Holder()
    s = await stack(EchoEngine(before_first_chunk=holder), gate={"max_concurrent": 1, "max_queue": 0})
    held = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body()))
    await holder.wait_arrived(1)

    resp = await s.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1" and resp.headers["retry-after-ms"] == "1000"
    error = (await resp.json())["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    assert "gate.max_queue=0" in error["message"]

    resp = await s.client.post("/v1/messages", json=messages_body())
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"

    holder.gate.set()
    assert (await held).status == 200


async def test_anthropic_overload_status_529(stack: StackFactory) -> None:
    holder = Holder()
    s = await stack(
        EchoEngine(before_first_chunk=holder),
        gate={"max_concurrent": 1, "max_queue": 0, "anthropic_overload_status": 529},
    )
    held = asyncio.create_task(s.client.post("/v1/messages", json=messages_body()))
    await holder.wait_arrived(1)
    resp = await s.client.post("/v1/messages", json=messages_body())
    assert resp.status == 529
    assert (await resp.json())["error"]["type"] == "overloaded_error"
    holder.gate.set()
    assert (await held).status == 200


async def test_queue_timeout_gives_429(stack: StackFactory) -> None:
    holder = Holder()
    s = await stack(EchoEngine(before_first_chunk=holder), gate={"max_concurrent": 1, "queue_timeout_s": 0.1})
    held = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body()))
    await holder.wait_arrived(1)
    started = time.monotonic()
    resp = await s.client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 429 and time.monotonic() - started >= 0.1
    assert (await resp.json())["error"]["code"] == "queue_timeout"
    assert s.app[POOL].stats().queued == 0
    holder.gate.set()
    assert (await held).status == 200


async def test_client_disconnect_while_queued_leaves_the_queue(stack: StackFactory) -> None:
    holder = Holder()
    s = await stack(EchoEngine(before_first_chunk=holder), gate={"max_concurrent": 1})
    held = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body()))
    await holder.wait_arrived(1)
    queued = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body()))
    await wait_for(lambda: s.app[POOL].stats().queued == 1)
    queued.cancel()  # the client goes away: its connection closes, the handler is cancelled
    await wait_for(lambda: s.app[POOL].stats().queued == 0)
    assert s.app[POOL].stats().leases == 1
    holder.gate.set()
    assert (await held).status == 200
    assert holder.arrived == 1  # the cancelled request never reached the engine


async def test_client_disconnect_before_ack_releases_the_lease(stack: StackFactory) -> None:
    holder = Holder()
    s = await stack(EchoEngine(before_first_chunk=holder), gate={"max_concurrent": 1})
    inflight = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body(stream=True)))
    await holder.wait_arrived(1)
    assert s.app[POOL].stats().leases == 1
    inflight.cancel()
    await wait_for(lambda: s.app[POOL].stats().leases == 0)
    holder.gate.set()


async def test_upstream_unreachable_gives_502_and_releases(stack: StackFactory) -> None:
    s = await stack()
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await s.upstream.close()
    s.app[UPSTREAM].base = f"http://127.0.0.1:{port}"
    for body in (chat_body(), chat_body(image=False)):
        resp = await s.client.post("/v1/chat/completions", json=body)
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert s.pool_is_idle()


async def test_ack_timeout_gives_504_and_releases(stack: StackFactory) -> None:
    async def stall(request: web.Request, body: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    s = await stack(EchoEngine(before_first_chunk=stall), upstream={"ack_timeout_s": 0.2})
    for stream in (False, True):
        resp = await s.client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert resp.status == 504
        assert "upstream.ack_timeout_s=0.2" in (await resp.json())["error"]["message"]
        assert s.pool_is_idle()


async def test_upstream_error_status_is_passed_through_and_releases(stack: StackFactory) -> None:
    async def fail(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response({"error": {"message": "engine says no", "type": "BadRequestError"}}, status=400)

    s = await stack(EchoEngine(before_first_chunk=fail))
    for stream in (False, True):
        resp = await s.client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "engine says no"
        assert s.pool_is_idle()


async def test_streaming_is_unbuffered_and_lease_is_freed_at_first_chunk(stack: StackFactory) -> None:
    engine = EchoEngine(token_s=0.1, tokens=5)
    s = await stack(engine, gate={"max_concurrent": 1})
    async with s.client.post("/v1/chat/completions", json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Accel-Buffering"] == "no"
        first = await resp.content.readany()
        t_first = time.monotonic()
        assert first.startswith(b"data: ")
        # The slot was freed at the first chunk, long before the stream ends.
        assert s.app[POOL].stats().leases == 0
        rest = await resp.read()
        assert time.monotonic() - t_first >= 0.3  # the tokens were still coming: nothing was buffered
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_stream_upgrade_reassembles_and_frees_the_slot_early(stack: StackFactory) -> None:
    engine = EchoEngine(token_s=0.1, tokens=5)
    s = await stack(engine, gate={"max_concurrent": 1})
    slow = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body(stream=False)))
    await wait_for(lambda: engine.stats.requests == 1)
    # With one slot, a second image request is admitted while the first is still generating.
    second = await s.client.post("/v1/chat/completions", json=chat_body(stream=False, max_tokens=1))
    assert second.status == 200
    assert not slow.done(), "the second request had to wait for the whole first generation"
    resp = await slow
    body = await resp.json()
    assert resp.headers["Content-Type"].startswith("application/json")
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    sent = engine.stats.bodies[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_stream_upgrade_off_holds_the_slot_until_the_whole_answer(stack: StackFactory) -> None:
    engine = EchoEngine(prefill_s=0.05)
    s = await stack(engine, upstream={"stream_upgrade": False})
    resp = await s.client.post("/v1/chat/completions", json=chat_body(stream=False))
    assert resp.status == 200
    assert (await resp.json())["object"] == "chat.completion"
    assert engine.stats.bodies[0]["stream"] is False


async def test_every_route_family_upgrades_and_reassembles(stack: StackFactory) -> None:
    s = await stack(EchoEngine(tokens=3))
    resp = await s.client.post("/v1/messages", json=messages_body())
    msg = await resp.json()
    assert resp.status == 200 and msg["type"] == "message"
    assert msg["content"] == [{"type": "text", "text": "tok0 tok1 tok2 "}] and msg["stop_reason"] == "max_tokens"
    responses_body = {
        "model": "echo",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "hi"},
                    {"type": "input_image", "image_url": chat_body()["messages"][0]["content"][0]["image_url"]["url"]},
                ],
            }
        ],
    }
    resp = await s.client.post("/v1/responses", json=responses_body)
    out = await resp.json()
    assert resp.status == 200 and out["object"] == "response" and out["status"] == "completed"
    assert out["output"][0]["content"][0]["text"] == "tok0 tok1 tok2 "
    assert [b.get("stream") for b in s.engine.stats.bodies] == [True, True]


async def test_text_is_passed_through_unchanged(stack: StackFactory) -> None:
    s = await stack()
    body = chat_body(image=False)
    raw = orjson.dumps(body)
    resp = await s.client.post("/v1/chat/completions", data=raw, headers={"content-type": "application/json"})
    assert resp.status == 200 and (await resp.json())["object"] == "chat.completion"
    assert list(s.engine.stats.bodies) == [body]  # not upgraded, not rewritten
    resp = await s.client.post("/v1/completions", json={"model": "echo", "prompt": "hi", "stream": True})
    assert resp.status == 200 and b"text_completion" in await resp.read()


async def test_request_id_is_kept_or_added_and_hop_by_hop_dropped(stack: StackFactory) -> None:
    seen: list[CIMultiDict[str]] = []

    async def record(request: web.Request, body: dict[str, Any]) -> None:
        seen.append(request.headers.copy())

    s = await stack(EchoEngine(before_first_chunk=record))
    resp = await s.client.post(
        "/v1/chat/completions",
        json=chat_body(image=False),
        headers={
            "x-request-id": "abc-123",
            "Proxy-Authorization": "secret",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Authorization": "Bearer k",
        },
    )
    assert resp.status == 200 and resp.headers["x-request-id"] == "abc-123"
    assert seen[0]["x-request-id"] == "abc-123"
    assert "Proxy-Authorization" not in seen[0] and "X-Hop" not in seen[0]
    assert seen[0]["Authorization"] == "Bearer k"
    resp = await s.client.post("/v1/chat/completions", json=chat_body(image=False))
    assert len(resp.headers["x-request-id"]) == 32


async def test_other_paths_and_models_pass_through(stack: StackFactory) -> None:
    s = await stack()
    resp = await s.client.get("/v1/models")
    assert resp.status == 200 and (await resp.json())["data"][0]["id"] == "echo"
    resp = await s.client.get("/v1/unknown/thing?x=1")
    assert resp.status == 404  # the engine's answer, passed through


async def test_body_too_large_gives_413(stack: StackFactory) -> None:
    s = await stack(server={"max_body_bytes": 4096})
    resp = await s.client.post("/v1/chat/completions", json=chat_body(text="x" * 5000))
    assert resp.status == 413
    assert "server.max_body_bytes=4096" in (await resp.json())["error"]["message"]


async def test_bad_json_and_bad_parts_give_400_naming_the_part(stack: StackFactory) -> None:
    s = await stack()
    resp = await s.client.post("/v1/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
    body = chat_body()
    body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,AAAA"
    resp = await s.client.post("/v1/chat/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "messages[0].content[0]"
    assert error["message"].startswith("messages[0].content[0]: ")
    resp = await s.client.post("/v1/messages", json={"model": "m", "messages": [{"role": "user", "content": 5}]})
    body = await resp.json()
    assert resp.status == 400 and body["type"] == "error" and "messages[0].content" in body["error"]["message"]
    assert s.engine.stats.requests == 0


async def test_health_ready_and_metrics(stack: StackFactory) -> None:
    s = await stack()
    assert (await s.client.get("/healthz")).status == 200
    assert (await s.client.get("/readyz")).status == 200
    await s.client.post("/v1/chat/completions", json=chat_body())
    text = await (await s.client.get("/metrics")).text()
    for name in (
        "mm_sidecar_slots_in_use 0.0",
        "mm_sidecar_reserved_bytes 0.0",
        "mm_sidecar_queue_depth 0.0",
        "mm_sidecar_queue_wait_seconds_count 1.0",
        "mm_sidecar_upstream_ack_seconds_count 1.0",
        'mm_sidecar_requests_total{family="openai",kind="multimodal",outcome="ok"} 1.0',
        'mm_sidecar_request_duration_seconds_count{family="openai",kind="multimodal"} 1.0',
        'mm_sidecar_upstream_responses_total{status_class="2xx"}',
    ):
        assert name in text, name
    s.app[STATE].draining = True
    assert (await s.client.get("/readyz")).status == 503
    resp = await s.client.post("/v1/chat/completions", json=chat_body(image=False))
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    s.app[STATE].draining = False
    await s.upstream.close()
    assert (await s.client.get("/readyz")).status == 503


async def test_real_client_session_against_mid_stream_upstream_failure(stack: StackFactory) -> None:
    async def broken(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices": []}\n\n')
        assert request.transport is not None
        request.transport.close()  # the engine dies mid-stream
        return resp

    s = await stack(EchoEngine(before_first_chunk=broken))
    resp = await s.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    data = await resp.read()
    # The status line was already sent: the failure arrives in-band, and the stream ends cleanly.
    assert data.startswith(b'data: {"choices": []}\n\n')
    assert b'"code":"upstream_bad_response"' in data
    assert s.pool_is_idle()


async def test_client_disconnect_while_streaming_closes_upstream_and_leaks_nothing(stack: StackFactory) -> None:
    engine = EchoEngine(token_s=0.05, tokens=100)
    s = await stack(engine)
    resp = await s.client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    await resp.content.readany()  # streaming has begun (the slot is already free)
    assert s.app[POOL].stats().leases == 0
    resp.close()  # the client goes away mid-stream
    await wait_for(lambda: s.app[STATE].inflight == 0)


async def test_event_loop_lag_is_sampled(stack: StackFactory) -> None:
    s = await stack()
    await asyncio.sleep(0.35)
    text = await (await s.client.get("/metrics")).text()
    count = next(line for line in text.splitlines() if line.startswith("mm_sidecar_event_loop_lag_seconds_count"))
    assert float(count.split()[1]) >= 2
    # Linux: each lag sample comes with the loop thread's CPU wait over the same window.
    waits = next(line for line in text.splitlines() if line.startswith("mm_sidecar_event_loop_cpu_wait_seconds_count"))
    assert float(waits.split()[1]) >= 2


async def test_an_answer_already_whole_goes_out_with_its_length(stack: StackFactory) -> None:
    # A non-streamed text answer is all in hand after the first read: relayed as one response with a
    # Content-Length (one write), byte for byte, not re-chunked.
    s = await stack()
    resp = await s.client.post("/v1/chat/completions", json=chat_body(image=False))
    body = await resp.read()
    assert resp.status == 200
    assert resp.headers.get("Transfer-Encoding") is None
    assert resp.headers["Content-Length"] == str(len(body))
    assert resp.headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body)["object"] == "chat.completion"


async def test_a_trickling_answer_that_is_not_sse_is_still_streamed(aiohttp_server: Any, aiohttp_client: Any) -> None:
    # Only an answer that is already complete is sent whole; one still arriving is relayed as it comes.
    async def slow(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "application/json"})
        await out.prepare(request)
        await out.write(b'{"part": 1,')
        await asyncio.sleep(0.4)
        await out.write(b' "part2": 2}')
        await out.write_eof()
        return out

    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", slow)
    upstream = await aiohttp_server(upstream_app)
    client = await aiohttp_client(create_app(make_config(str(upstream.make_url("")).rstrip("/"))))
    async with client.post("/v1/chat/completions", json=chat_body(image=False)) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        t_first = time.monotonic()
        assert first == b'{"part": 1,'
        rest = await resp.read()
        assert time.monotonic() - t_first >= 0.3
        assert rest == b' "part2": 2}'
    await assert_invariant(client)


async def test_the_echo_engine_keeps_only_the_latest_bodies(stack: StackFactory) -> None:
    # echo-upstream runs for hours in benchmarks and demos: what it keeps for tests must stay bounded.
    s = await stack()
    limit = s.engine.stats.bodies.maxlen
    assert limit is not None
    for i in range(limit + 5):
        assert (await s.client.post("/v1/chat/completions", json=chat_body(image=False, text=f"n{i}"))).status == 200
    assert len(s.engine.stats.bodies) == limit
    assert s.engine.stats.bodies[-1]["messages"][0]["content"][0]["text"] == f"n{limit + 4}"


async def test_queue_capacity_is_exported_for_the_alert(stack: StackFactory) -> None:
    # The queue alert compares mm_sidecar_queue_depth with 75% of this gauge: it must be the config's.
    s = await stack(gate={"max_queue": 37})
    text = await (await s.client.get("/metrics")).text()
    assert "mm_sidecar_queue_capacity 37.0" in text.splitlines()


class RawEngine(EchoEngine):
    """The echo engine, recording the headers and raw bytes of every request, with one more route
    (`/tokenize`, as vLLM has) that only the pass-through handler serves."""

    def __init__(self) -> None:
        super().__init__(before_first_chunk=self._record)
        self.seen: list[tuple[CIMultiDict[str], bytes]] = []

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/tokenize", self._tokenize)
        return app

    async def _record(self, request: web.Request, body: dict[str, Any]) -> None:
        self.seen.append((request.headers.copy(), await request.read()))

    async def _tokenize(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.seen.append((request.headers.copy(), raw))
        return web.json_response({"count": len(orjson.loads(raw)["prompt"])})


CODINGS: list[tuple[str, Callable[[bytes], bytes]]] = [("gzip", gzip.compress), ("deflate", zlib.compress)]


@pytest.mark.parametrize(("coding", "compress"), CODINGS)
async def test_compressed_bodies_reach_the_engine_decoded_with_their_own_length(
    stack: StackFactory, coding: str, compress: Callable[[bytes], bytes]
) -> None:
    # aiohttp's server decodes the body before we read it: forwarding the coding too made the
    # engine decode plain JSON (500). Every path: text, multimodal (rewritten), Anthropic, pass-through.
    engine = RawEngine()
    s = await stack(engine)
    sent = [  # path, body, whether the sidecar rewrites it (a multimodal request is upgraded to a stream)
        ("/v1/chat/completions", chat_body(image=False), False),
        ("/v1/chat/completions", chat_body(), True),
        ("/v1/messages", messages_body(), True),
        ("/tokenize", {"model": "echo", "prompt": "four"}, False),
    ]
    for path, body, _ in sent:
        raw = orjson.dumps(body)
        headers = {"Content-Encoding": coding.upper(), "Content-Type": "application/json"}
        resp = await s.client.post(path, data=compress(raw), headers=headers)
        assert resp.status == 200, (path, await resp.text())
        await resp.read()
    assert await (await s.client.post("/tokenize", json={"prompt": "ab"})).json() == {"count": 2}
    assert len(engine.seen) == len(sent) + 1
    for (received, raw), (path, body, rewritten) in zip(engine.seen, sent, strict=False):  # the last is plain
        assert "Content-Encoding" not in received, path
        assert received["Content-Length"] == str(len(raw)), path
        if rewritten:
            assert orjson.loads(raw)["stream"] is True, path
        else:
            assert raw == orjson.dumps(body), path  # byte for byte what the client compressed


@pytest.mark.parametrize(("coding", "compress"), CODINGS)
async def test_a_compressed_body_inflating_past_max_body_bytes_is_413(
    stack: StackFactory, coding: str, compress: Callable[[bytes], bytes]
) -> None:
    # The cap is on the decoded bytes (what the sidecar holds), not on the few hundred on the wire.
    engine = RawEngine()
    s = await stack(engine, server={"max_body_bytes": 4096})
    message = "request body is more than server.max_body_bytes=4096 bytes"
    openai_error = {"message": message, "type": "invalid_request_error", "param": None, "code": "body_too_large"}
    anthropic_error = {"type": "request_too_large", "message": message}
    cases = [
        ("/v1/chat/completions", chat_body(image=False, text="x" * 100_000), {"error": openai_error}),
        (
            "/v1/messages",
            {**messages_body(image=False), "system": "x" * 100_000},
            {"type": "error", "error": anthropic_error},
        ),
        ("/tokenize", {"model": "echo", "prompt": "x" * 100_000}, {"error": openai_error}),
    ]
    for path, body, expected in cases:
        wire = compress(orjson.dumps(body))
        assert len(wire) < 4096
        resp = await s.client.post(
            path, data=wire, headers={"Content-Encoding": coding, "Content-Type": "application/json"}
        )
        assert resp.status == 413, path
        assert resp.headers["Content-Type"] == "application/json"
        assert await resp.json() == expected, path
    assert engine.seen == [] and engine.stats.requests == 0


async def _chunked(raw: bytes, piece: int) -> Any:
    for lo in range(0, len(raw), piece):
        yield raw[lo : lo + piece]
        await asyncio.sleep(0)  # pieces on the wire one by one, not one write


async def test_chunked_uploads_reach_the_engine_byte_for_byte_and_stop_at_max_body_bytes(stack: StackFactory) -> None:
    # No Content-Length: the buffer spans max_body_bytes of address space and the chunks are copied
    # in as they come. The bytes the engine gets are the client's, and one byte over the cap is 413.
    engine = RawEngine()
    s = await stack(engine, server={"max_body_bytes": 600_000})
    raw = orjson.dumps({"model": "echo", "prompt": "y" * 500_000})
    resp = await s.client.post("/tokenize", data=_chunked(raw, 7_001), headers={"Content-Type": "application/json"})
    assert resp.status == 200 and await resp.json() == {"count": 500_000}
    received, got = engine.seen[-1]
    assert "Transfer-Encoding" not in received and received["Content-Length"] == str(len(raw))
    assert got == raw
    text = orjson.dumps(chat_body(image=False, text="z" * 400_000))
    resp = await s.client.post(
        "/v1/chat/completions", data=_chunked(text, 65_536), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200, await resp.text()
    assert engine.seen[-1][1] == text
    over = orjson.dumps({"model": "echo", "prompt": "y" * 600_000})
    resp = await s.client.post("/tokenize", data=_chunked(over, 50_000), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["message"] == "request body is more than server.max_body_bytes=600000 bytes"
    assert len(engine.seen) == 2 and s.app[BODIES].held == 0


async def test_a_body_buffer_the_kernel_refuses_is_503_and_charges_nothing(
    stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under strict overcommit an upload without Content-Length may be refused its max_body_bytes
    # of address space: the client is told to retry, as for a full budget, and nothing is held.
    engine = RawEngine()
    s = await stack(engine, server={"max_body_bytes": 600_000})

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(bodies.mmap, "mmap", refused)
    raw = orjson.dumps({"model": "echo", "prompt": "y" * 100_000})
    resp = await s.client.post("/tokenize", data=_chunked(raw, 7_001), headers={"Content-Type": "application/json"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    error = (await resp.json())["error"]
    assert (error["code"], error["message"]) == (
        "body_memory_full",
        "no memory for a request body of up to 600000 bytes; retry later",
    )
    assert engine.seen == [] and s.app[BODIES].held == 0
