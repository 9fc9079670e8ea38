"""Offload mode against a protocol-speaking fake engine: the handoff, the ack and every way it can fail.

The fake engine is a real reader: it validates the descriptors and copies the tensors out of the
sidecar's real /dev/shm arena with `ArenaReader`, as an engine author would. Then it behaves as each
test asks: answers, rejects, never answers, or dies before its headers.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import openai
import orjson
import pytest
import torch
from aiohttp import web

from preprocess.processors import decode, load_processor, raw_normalisation, run_processor
from preprocess.protocol import ArenaReader, DescriptorError, ImageNormalization, TensorDescriptor, shm_token
from sidecar.app import create_app
from sidecar.app_keys import PIPELINE, POOL, STATE
from sidecar.hollow import HOLLOW_MIN_BODY
from sidecar.sse import SSEParser

from .conftest import assert_invariant, image_bytes, make_config
from .test_hollow import noise_png

Behaviour = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse | None]]


class FakeEngine:
    def __init__(self, token: str | None = None, pixels: list[str] | None = None) -> None:
        self.token = token or shm_token("/dev/shm")
        self.pixels = pixels  # /health's shm.pixels; None: not listed (an engine that takes float32 only)
        self.reader = ArenaReader("/dev/shm")
        self.received: list[dict[str, np.ndarray]] = []
        self.bodies: list[dict[str, Any]] = []
        self.behaviour: Behaviour | None = None
        self.server: Any = None  # the TestServer serving it, once started

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 28)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        self.reader.close()

    async def health(self, request: web.Request) -> web.Response:
        shm: dict[str, Any] = {"dir": "/dev/shm", "token": self.token}
        if self.pixels is not None:
            shm["pixels"] = self.pixels
        return web.json_response({"status": "ok", "shm": shm})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if self.behaviour is not None:
            early = await self.behaviour(request, body)
            if early is not None:
                return early
        try:
            for message in body["messages"]:
                for part in message["content"] if isinstance(message["content"], list) else []:
                    if part["type"] == "image_tensors":
                        descs = {n: TensorDescriptor.from_json(d) for n, d in part["tensors"].items()}
                        self.received.append({n: _numpy(self.reader.copy_out(d)) for n, d in descs.items()})
        except DescriptorError as exc:
            return web.json_response({"error": {"message": str(exc), "type": "invalid_request_error"}}, status=400)
        answer = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return web.json_response(answer)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: its bit patterns, as the arena holds them.
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def chat_with_png(data: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {
        "model": "m",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }


def chat_with_images(*sizes: tuple[int, int]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "what?"}]
    for w, h in sizes:
        url = "data:image/png;base64," + base64.b64encode(image_bytes(w, h)).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


@pytest.fixture
async def offload(
    aiohttp_server: Any, aiohttp_client: Any
) -> AsyncIterator[Callable[..., Awaitable[tuple[Any, FakeEngine]]]]:
    built: list[Any] = []

    async def build(engine: FakeEngine | None = None, **sections: dict[str, Any]) -> tuple[Any, FakeEngine]:
        engine = engine or FakeEngine()
        upstream = await aiohttp_server(engine.app())
        engine.server = upstream
        raw: dict[str, Any] = {
            "upstream": {"mode": "offload", "ack_timeout_s": 5},
            "preprocess": {"processor": "qwen2-vl", "workers": 1},
            "gate": {"max_bytes": "64MiB"},
            "shm": {"name": f"test-{id(engine):x}"},
        }
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        client = await aiohttp_client(create_app(make_config(str(upstream.make_url("")).rstrip("/"), **raw)))
        async with asyncio.timeout(10):
            while not client.app[STATE].engine_verified and not client.app[STATE].stop.is_set():
                await asyncio.sleep(0.02)
        built.append(client)
        return client, engine

    yield build
    for client in built:
        await assert_invariant(client, settle_s=30)


def assert_all_free(client: Any) -> None:
    stats = client.app[POOL].stats()
    assert (stats.leases, stats.reserved_bytes, stats.queued) == (0, 0, 0)
    assert client.app[PIPELINE].stats()[0].extents == 0


async def wait_all_free(client: Any) -> None:
    async with asyncio.timeout(30):
        while client.app[PIPELINE].stats()[0].extents or client.app[POOL].stats().leases:
            await asyncio.sleep(0.02)
    assert_all_free(client)


async def test_tensors_reach_the_engine_bit_identical_and_everything_is_freed(offload: Any) -> None:
    client, engine = await offload()
    resp = await client.post("/v1/chat/completions", json=chat_with_images((64, 48), (300, 90)))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"] == "ok"
    processor = load_processor("qwen2-vl")
    for got, (w, h) in zip(engine.received, ((64, 48), (300, 90)), strict=True):
        want = run_processor(processor, decode(image_bytes(w, h)))
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])
    parts = engine.bodies[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_tensors", "image_tensors"]
    assert set(parts[1]["tensors"]) == {"pixel_values", "image_grid_thw"}
    assert_all_free(client)


async def test_an_image_left_in_the_body_buffer_is_staged_and_preprocessed_bit_identical(offload: Any) -> None:
    # A noise PNG whose base64 (~1.9 MiB) makes the body one that is parsed hollow: the worker's input
    # is copied into the extent from the request's buffer, piece by piece, in both request shapes.
    png = noise_png(800, 600)
    b64 = base64.b64encode(png).decode()
    client, engine = await offload()
    chat = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}
    anthropic = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    for path, part in (("/v1/chat/completions", chat), ("/v1/messages", anthropic)):
        body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [part]}]}
        assert len(orjson.dumps(body)) > HOLLOW_MIN_BODY
        resp = await client.post(path, json=body)
        assert resp.status == 200, await resp.text()
    want = run_processor(load_processor("qwen2-vl"), decode(png))
    assert len(engine.received) == 2
    for got in engine.received:
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])
    await wait_all_free(client)


async def test_the_byte_budget_is_exactly_gate_max_bytes(offload: Any) -> None:
    # The arena maps gate.max_bytes of data pages (its header and page table come on top), so the
    # budget, its metric and the refusal quote the configured number, not what was left of it.
    client, _ = await offload()
    assert client.app[POOL].max_bytes == 64 << 20
    assert client.app[PIPELINE].capacity == 64 << 20
    metrics = await (await client.get("/metrics")).text()
    assert "mm_sidecar_capacity_bytes 6.7108864e+07" in metrics
    resp = await client.post("/v1/chat/completions", json=chat_with_images(*[(4000, 4000)] * 8))
    error = (await resp.json())["error"]
    assert resp.status == 413 and error["code"] == "over_budget", error
    assert "(gate.max_bytes=67108864)" in error["message"]


async def test_engine_rejecting_a_descriptor_frees_the_extent_once(offload: Any) -> None:
    async def reject(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response(
            {"error": {"message": "stale generation", "type": "invalid_request_error"}}, status=400
        )

    client, engine = await offload()
    engine.behaviour = reject
    resp = await client.post("/v1/chat/completions", json=chat_with_images((64, 48)))
    assert resp.status == 400 and (await resp.json())["error"]["message"] == "stale generation"
    assert_all_free(client)


async def test_ack_timeout_frees_the_extent_and_answers_504(offload: Any) -> None:
    async def never(request: web.Request, body: dict[str, Any]) -> None:
        await asyncio.sleep(60)

    client, engine = await offload(upstream={"ack_timeout_s": 0.5})
    engine.behaviour = never
    resp = await client.post("/v1/chat/completions", json=chat_with_images((64, 48)))
    assert resp.status == 504
    assert "upstream.ack_timeout_s=0.5" in (await resp.json())["error"]["message"]
    assert_all_free(client)


async def test_engine_dying_between_handoff_and_ack_frees_the_extent(offload: Any) -> None:
    async def die(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.StreamResponse()

    client, engine = await offload()
    engine.behaviour = die
    resp = await client.post("/v1/chat/completions", json=chat_with_images((64, 48)))
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert_all_free(client)


async def test_client_disconnect_during_preprocessing_frees_after_the_worker(offload: Any) -> None:
    hold = asyncio.Event()

    async def park(request: web.Request, body: dict[str, Any]) -> None:
        await hold.wait()

    client, engine = await offload()
    engine.behaviour = park
    task = asyncio.create_task(client.post("/v1/chat/completions", json=chat_with_images((1920, 1080))))
    async with asyncio.timeout(10):
        while client.app[PIPELINE].stats()[1].busy == 0:
            await asyncio.sleep(0.005)
    task.cancel()
    await wait_all_free(client)
    assert engine.bodies == []  # never forwarded
    hold.set()


async def test_bad_image_bytes_are_a_400_naming_the_part(offload: Any) -> None:
    client, engine = await offload()
    # A valid PNG header (the probe passes) over a corrupt body: only the decode can tell.
    png = bytearray(image_bytes(64, 48))
    png[60:] = b"\x00" * (len(png) - 60)
    body = chat_with_images()
    body["messages"][0]["content"].append(
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(bytes(png)).decode()}}
    )
    resp = await client.post("/v1/chat/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "messages[0].content[1]"
    assert "cannot decode the image" in error["message"]
    assert engine.bodies == []
    assert_all_free(client)


async def test_an_engine_on_another_shm_is_refused(offload: Any) -> None:
    client, _ = await offload(FakeEngine(token="some-other-host:42"))
    assert client.app[STATE].stop.is_set() and client.app[STATE].exit_code == 2
    assert not client.app[STATE].engine_verified
    resp = await client.post("/v1/chat/completions", json=chat_with_images((8, 8)))
    assert resp.status == 502 and "not been verified" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize("listed", [None, ["float32"]])
async def test_a_uint8_sidecar_refuses_an_engine_that_takes_float32_only(
    offload: Any, listed: list[str] | None, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = await offload(FakeEngine(pixels=listed), preprocess={"transport_dtype": "uint8"})
    assert client.app[STATE].stop.is_set() and client.app[STATE].exit_code == 2
    assert not client.app[STATE].engine_verified
    refusal = [r.getMessage() for r in caplog.records if "offload mode refused" in r.getMessage()]
    assert refusal and "['float32']" in refusal[0] and "--pixels uint8" in refusal[0], refusal


async def test_uint8_transport_sends_raw_patches_and_their_normalisation(offload: Any) -> None:
    client, engine = await offload(FakeEngine(pixels=["float32", "uint8"]), preprocess={"transport_dtype": "uint8"})
    assert client.app[STATE].engine_verified
    data = noise_png(333, 517)
    body = {
        "model": "m",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
                    }
                ],
            }
        ],
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    (part,) = engine.bodies[0]["messages"][0]["content"]
    processor = load_processor("qwen2-vl")
    assert part["normalize"] == raw_normalisation(processor)
    (got,) = engine.received
    want = run_processor(processor, decode(data), raw=True)
    assert got["pixel_values"].dtype == np.uint8 and np.array_equal(got["pixel_values"], want["pixel_values"])
    assert np.array_equal(got["image_grid_thw"], want["image_grid_thw"])
    # The engine's normalisation of those bytes is the processor's float32, bit for bit.
    norm = ImageNormalization.from_json(part["normalize"], "normalize")
    table = norm.table()
    raw = got["pixel_values"].reshape(got["pixel_values"].shape[0], 3, -1)
    floats = np.stack([table[c][raw[:, c]] for c in range(3)], axis=1).reshape(raw.shape[0], -1)
    assert np.array_equal(floats, run_processor(processor, decode(data))["pixel_values"])
    assert_all_free(client)


async def test_a_bfloat16_sidecar_refuses_an_engine_without_bfloat16(
    offload: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # What vllm-engine lists: one dtype, float32 or uint8.
    client, _ = await offload(FakeEngine(pixels=["uint8"]), preprocess={"transport_dtype": "bfloat16"})
    assert client.app[STATE].stop.is_set() and client.app[STATE].exit_code == 2
    refusal = [r.getMessage() for r in caplog.records if "offload mode refused" in r.getMessage()]
    assert refusal and "['uint8']" in refusal[0] and "'bfloat16'" in refusal[0], refusal
    assert "vllm-engine: float32 or uint8" in refusal[0], refusal


async def test_bfloat16_transport_sends_the_processors_pixels_rounded_as_torch_rounds_them(offload: Any) -> None:
    client, engine = await offload(
        FakeEngine(pixels=["float32", "bfloat16", "uint8"]), preprocess={"transport_dtype": "bfloat16"}
    )
    assert client.app[STATE].engine_verified
    data = noise_png(333, 517)
    resp = await client.post("/v1/chat/completions", json=chat_with_png(data))
    assert resp.status == 200, await resp.text()
    (part,) = engine.bodies[0]["messages"][0]["content"]
    assert part["tensors"]["pixel_values"]["dtype"] == "bfloat16" and part.get("normalize") is None
    (got,) = engine.received
    want = run_processor(load_processor("qwen2-vl"), decode(data))
    assert got["pixel_values"].dtype == np.uint16  # the bits, as numpy holds bfloat16
    rounded = torch.from_numpy(want["pixel_values"]).to(torch.bfloat16)
    assert np.array_equal(got["pixel_values"], rounded.view(torch.int16).numpy().view(np.uint16))
    assert got["pixel_values"].nbytes * 2 == want["pixel_values"].nbytes  # half the bytes of float32
    assert np.array_equal(got["image_grid_thw"], want["image_grid_thw"])
    assert_all_free(client)


async def test_engine_crash_and_restart_the_sidecar_recovers_by_itself(offload: Any, aiohttp_server: Any) -> None:
    client, engine = await offload()
    assert engine.server is not None and engine.server.port is not None
    port = engine.server.port
    resp = await client.post("/v1/chat/completions", json=chat_with_images((32, 32)))
    assert resp.status == 200
    # The engine dies: requests fail cleanly, nothing is held.
    await engine.server.close()
    resp = await client.post("/v1/chat/completions", json=chat_with_images((32, 32)))
    assert resp.status == 502
    assert_all_free(client)
    # It comes back on the same address: the very next request succeeds, no sidecar restart.
    await aiohttp_server(FakeEngine().app(), port=port)
    resp = await client.post("/v1/chat/completions", json=chat_with_images((32, 32)))
    assert resp.status == 200, await resp.text()
    assert_all_free(client)


async def test_client_disconnect_between_handoff_and_ack_frees_once(offload: Any) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def park(request: web.Request, body: dict[str, Any]) -> None:
        arrived.set()  # the descriptors are here; the engine has not answered headers yet
        await release.wait()

    client, engine = await offload()
    engine.behaviour = park
    task = asyncio.create_task(client.post("/v1/chat/completions", json=chat_with_images((64, 48))))
    await asyncio.wait_for(arrived.wait(), 30)
    assert client.app[PIPELINE].stats()[0].extents == 1
    task.cancel()
    await wait_all_free(client)
    # An engine that reads the descriptors now finds them stale, never another request's data.
    release.set()
    desc = TensorDescriptor.from_json(engine.bodies[0]["messages"][0]["content"][1]["tensors"]["pixel_values"])
    with pytest.raises(DescriptorError):
        engine.reader.validate(desc)


# ------------------------------------------------------------------------------------------------
# Engine errors on translated routes: the client's own error shape, the engine's status and message

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
MESSAGES_TEXT: dict[str, Any] = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES_TEXT: dict[str, Any] = {"model": "m", "input": "hi"}


def messages_with_image() -> dict[str, Any]:
    b64 = base64.b64encode(image_bytes(64, 48)).decode()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    return {**MESSAGES_TEXT, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]}


async def test_engine_error_statuses_reach_translated_clients_in_their_own_shape(offload: Any) -> None:
    answer: dict[str, Any] = {}

    async def fail(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response(answer["body"], status=answer["status"], headers=answer.get("headers"))

    client, engine = await offload()
    engine.behaviour = fail
    for status, anthropic_type in ANTHROPIC_TYPES.items():
        # As vLLM answers: a Python class name in `type`, the status in `code`.
        message = f"engine says no ({status})"
        answer.update(
            status=status,
            body={"error": {"message": message, "type": "BadRequestError", "param": "messages", "code": status}},
            headers={"Retry-After": "7"} if status == 429 else None,
        )
        for stream in (False, True):  # an error before the first chunk is a real status, streamed or not
            resp = await client.post("/v1/messages", json={**MESSAGES_TEXT, "stream": stream})
            assert resp.status == status
            assert resp.headers["Content-Type"] == "application/json"
            assert len(resp.headers["x-request-id"]) == 32
            assert (resp.headers.get("Retry-After"), resp.headers.get("Transfer-Encoding")) == (
                "7" if status == 429 else None,
                None,
            )
            assert await resp.json() == {"type": "error", "error": {"type": anthropic_type, "message": message}}

            resp = await client.post("/v1/responses", json={**RESPONSES_TEXT, "stream": stream})
            assert resp.status == status and resp.headers["Content-Type"] == "application/json"
            assert resp.headers.get("Retry-After") == ("7" if status == 429 else None)
            # OpenAI's shape; `code` is OpenAI's string code, which an HTTP status is not.
            error = {"message": message, "type": "BadRequestError", "param": "messages", "code": None}
            assert await resp.json() == {"error": error}

    # Older vLLM and SGLang answer a flat error object; OpenAI-style string codes are kept.
    answer.update(
        status=400, body={"object": "error", "message": "bad n", "type": "invalid_request_error", "code": "bad_n"}
    )
    resp = await client.post("/v1/messages", json=MESSAGES_TEXT)
    assert await resp.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": "bad n"}}
    resp = await client.post("/v1/responses", json=RESPONSES_TEXT)
    error = {"message": "bad n", "type": "invalid_request_error", "param": None, "code": "bad_n"}
    assert resp.status == 400 and await resp.json() == {"error": error}
    assert len(engine.bodies) == 2 * 2 * len(ANTHROPIC_TYPES) + 2


async def test_an_engine_error_that_is_not_json_keeps_its_text(offload: Any) -> None:
    async def crash(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")

    client, engine = await offload()
    engine.behaviour = crash
    text = "500 Internal Server Error\n\nServer got itself in trouble"
    resp = await client.post("/v1/messages", json={**MESSAGES_TEXT, "stream": True})
    assert resp.status == 500 and resp.headers["Content-Type"] == "application/json"
    assert await resp.json() == {"type": "error", "error": {"type": "api_error", "message": text}}
    resp = await client.post("/v1/responses", json=RESPONSES_TEXT)
    assert resp.status == 500
    assert await resp.json() == {"error": {"message": text, "type": "server_error", "param": None, "code": None}}


async def test_an_engine_refusing_translated_tensors_answers_anthropic_and_frees_the_extent(offload: Any) -> None:
    # The multimodal path: the lease is released at the engine's (error) headers, the body still translated.
    async def reject(request: web.Request, body: dict[str, Any]) -> web.Response:
        error = {"message": "stale generation", "type": "BadRequestError", "param": None, "code": 400}
        return web.json_response({"error": error}, status=400)

    client, engine = await offload()
    engine.behaviour = reject
    for stream in (False, True):
        resp = await client.post("/v1/messages", json={**messages_with_image(), "stream": stream})
        assert resp.status == 400
        assert await resp.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "stale generation"},
        }
        assert_all_free(client)
    assert [p["type"] for p in engine.bodies[0]["messages"][0]["content"]] == ["image_tensors", "text"]


_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":0,"model":"fake",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Half"},"finish_reason":null}]}\n\n'
)


def client_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    return [(event.event, orjson.loads(event.data)) for event in SSEParser().feed(raw)]


async def test_failures_after_the_first_chunk_are_error_events_in_the_clients_grammar(offload: Any) -> None:
    ending: dict[str, bytes | None] = {}

    async def half(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_CHUNK)
        tail = ending["tail"]
        if tail is None:
            assert request.transport is not None
            request.transport.close()  # the engine dies mid-stream
            return resp
        await resp.write(tail)
        await resp.write_eof()
        return resp

    client, engine = await offload()
    engine.behaviour = half
    in_band = b'data: {"error":{"message":"EngineCore died","type":"InternalServerError","param":null,"code":500}}\n\n'
    for tail in (in_band, None):
        ending["tail"] = tail
        resp = await client.post("/v1/messages", json={**MESSAGES_TEXT, "stream": True})
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = client_events(await resp.read())
        names = [name for name, _ in events]
        assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "error"]
        error = events[-1][1]
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        if tail is None:
            assert error["error"]["message"].startswith("the engine broke off the stream: ")
        else:
            assert error == {"type": "error", "error": {"type": "api_error", "message": "EngineCore died"}}

        resp = await client.post("/v1/responses", json={**RESPONSES_TEXT, "stream": True})
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = client_events(await resp.read())
        assert [name for name, _ in events] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "error",
        ]
        assert [payload["sequence_number"] for _, payload in events] == list(range(6))
        error = events[-1][1]
        if tail is None:
            # Not the chat form (`data: {"error": ...}`), which a Responses client cannot read.
            assert (error["type"], error["code"], error["param"]) == ("error", "upstream_bad_response", None)
            assert error["message"].startswith("the engine broke off the stream: ")
        else:
            assert error == {
                "type": "error",
                "sequence_number": 5,
                "code": "InternalServerError",
                "message": "EngineCore died",
                "param": None,
            }


async def test_an_engine_going_silent_mid_stream_ends_the_translated_stream_with_an_error(offload: Any) -> None:
    async def stall(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_CHUNK)
        await asyncio.sleep(5)
        return resp

    client, engine = await offload(upstream={"read_timeout_s": 0.3})
    engine.behaviour = stall
    resp = await client.post("/v1/messages", json={**MESSAGES_TEXT, "stream": True})
    assert resp.status == 200
    message = "the engine went silent longer than upstream.read_timeout_s"
    assert client_events(await resp.read())[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": message}},
    )
    resp = await client.post("/v1/responses", json={**RESPONSES_TEXT, "stream": True})
    assert client_events(await resp.read())[-1] == (
        "error",
        {"type": "error", "sequence_number": 5, "code": "upstream_timeout", "message": message, "param": None},
    )


# ------------------------------------------------------------------------------------------------
# /v1/completions: a text request, sent to the engine as chat and answered as text_completion

COMPLETIONS_TEXT: dict[str, Any] = {"model": "m", "prompt": "Say ok.", "max_tokens": 4, "stop": ["\n"]}
CHAT_OF_COMPLETIONS: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "Say ok."}],
    "max_tokens": 4,
    "stop": ["\n"],
}
STREAM_USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def chat_stream(*texts: str) -> Behaviour:
    """An engine that streams its answer in chat chunks: a role chunk, one chunk per text (the last one
    finishing), the usage chunk if the request asked for it, then [DONE]."""

    async def stream(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        head = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
        deltas = [{"role": "assistant", "content": ""}, *({"content": text} for text in texts)]
        for i, delta in enumerate(deltas):
            choice = {"index": 0, "delta": delta, "finish_reason": "stop" if i == len(deltas) - 1 else None}
            await resp.write(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": STREAM_USAGE}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return stream


async def test_a_completion_goes_to_the_engine_as_chat_and_comes_back_as_text_completion(offload: Any) -> None:
    client, engine = await offload()
    resp = await client.post("/v1/completions", json=COMPLETIONS_TEXT)
    assert resp.status == 200, await resp.text()
    assert engine.bodies == [CHAT_OF_COMPLETIONS]  # recorded by the engine's chat route, its only POST route
    assert await resp.json() == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "text": "ok", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


async def test_a_streamed_completion_is_translated_chunk_by_chunk(offload: Any) -> None:
    client, engine = await offload()
    engine.behaviour = chat_stream("o", "k")
    body = {**COMPLETIONS_TEXT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    assert engine.bodies == [{**CHAT_OF_COMPLETIONS, "stream": True, "stream_options": {"include_usage": True}}]
    events = SSEParser().feed(await resp.read())
    assert [event.event for event in events] == [None] * 5 and events[-1].data == "[DONE]"
    chunks = [orjson.loads(event.data) for event in events[:-1]]
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        ("cmpl-2", "text_completion", 0, "fake")
    }
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "o", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "k", "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    assert chunks[-1]["usage"] == STREAM_USAGE


async def test_the_openai_sdk_reads_both_completion_answers(offload: Any) -> None:
    client, engine = await offload()
    sdk = openai.AsyncOpenAI(api_key="k", base_url=str(client.make_url("/v1")), max_retries=0)
    async with sdk:
        done = await sdk.completions.create(model="m", prompt="Say ok.", max_tokens=4)
        assert (done.object, done.choices[0].text, done.choices[0].finish_reason) == ("text_completion", "ok", "stop")
        engine.behaviour = chat_stream("o", "k")
        stream = await sdk.completions.create(model="m", prompt=["Say ok."], max_tokens=4, stream=True)
        assert "".join([chunk.choices[0].text async for chunk in stream if chunk.choices]) == "ok"
    assert [b["messages"] for b in engine.bodies] == [[{"role": "user", "content": "Say ok."}]] * 2


async def test_what_chat_cannot_express_is_refused_before_the_engine(offload: Any) -> None:
    client, engine = await offload()
    refuses = "offload mode translates /v1/completions to chat completions, which cannot express"
    for extra, param, what in (
        ({"prompt": [9906, 13]}, "prompt", "a prompt of token ids; send it as text"),
        ({"prompt": ["a", "b"]}, "prompt", "several prompts in one request (got 2); send one per request"),
        ({"echo": True}, "echo", "echo (the prompt repeated in the answer)"),
        ({"suffix": "!"}, "suffix", "suffix (text to follow the completion)"),
        ({"best_of": 2}, "best_of", "best_of=2 (the best of several completions)"),
        ({"logprobs": 1}, "logprobs", "logprobs=1 (completions-style log probabilities)"),
    ):
        resp = await client.post("/v1/completions", json={**COMPLETIONS_TEXT, **extra})
        assert resp.status == 400
        error = {"message": f"{param}: {refuses} {what}", "type": "invalid_request_error", "param": param}
        assert await resp.json() == {"error": {**error, "code": "bad_request"}}
    assert engine.bodies == []


async def test_engine_errors_on_completions_keep_their_status_and_openai_shape(offload: Any) -> None:
    async def busy(request: web.Request, body: dict[str, Any]) -> web.Response:
        error = {"message": "too many requests", "type": "RateLimitError", "param": None, "code": 429}
        return web.json_response({"error": error}, status=429, headers={"Retry-After": "3"})

    client, engine = await offload()
    engine.behaviour = busy
    for stream in (False, True):
        resp = await client.post("/v1/completions", json={**COMPLETIONS_TEXT, "stream": stream})
        assert resp.status == 429 and resp.headers["Content-Type"] == "application/json"
        assert resp.headers["Retry-After"] == "3"
        error = {"message": "too many requests", "type": "RateLimitError", "param": None, "code": None}
        assert await resp.json() == {"error": error}
    assert len(engine.bodies) == 2
