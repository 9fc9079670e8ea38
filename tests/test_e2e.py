"""End to end: the sidecar in offload mode in front of the real reference engine (2 ranks, gloo, tiny Qwen2-VL).

The engine runs as `mm-sidecar engine --tp 2 --report-checksums` (one per module: starting two
ranks costs seconds); each rank reports SHA-256 checksums of the tensors it copied out of shared
memory, which must equal the checksums of the processor's own output for the same image.

The attack tests talk to the engine's port directly, as anything in the pod's network namespace can:
forged descriptors for a victim's live extent must get the fixed refusal and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import numpy as np
import openai
import pytest
from aiohttp import web
from PIL import Image

from preprocess.cost import output_nbytes
from preprocess.processors import bfloat16_bits, decode, load_processor, read_spec, resolve_processor, run_processor
from preprocess.protocol import DESCRIPTOR_ERROR, TensorDescriptor
from sidecar.app import create_app
from sidecar.app_keys import PIPELINE, POOL, SPEC, STATE

from .conftest import assert_invariant, engine_process, make_config


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from engine.tiny import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with engine_process(["--model", str(model), "--tp", "2", "--report-checksums"], log) as url:
        yield url


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def expected_sums(data: bytes) -> dict[str, str]:
    outputs = run_processor(load_processor("qwen2-vl"), decode(data))
    return {name: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for name, a in outputs.items()}


async def sidecar(aiohttp_server: Any, engine: str, pixels: str = "float32") -> Any:
    config = make_config(
        engine,
        upstream={"mode": "offload", "ack_timeout_s": 60},
        preprocess={"processor": "qwen2-vl", "workers": 1, "transport_dtype": pixels},
        gate={"max_concurrent": 2, "max_bytes": "192MiB"},
        shm={"name": f"e2e-{os.getpid()}-{pixels}"},
    )
    server = await aiohttp_server(create_app(config))
    async with asyncio.timeout(30):
        while not server.app[STATE].engine_verified:
            await asyncio.sleep(0.05)
    return server


async def assert_idle(server: Any) -> None:
    stats = server.app[POOL].stats()
    assert (stats.leases, stats.reserved_bytes, stats.queued) == (0, 0, 0)
    arena = server.app[PIPELINE].stats()[0]
    assert arena.extents == 0 and arena.free_bytes == arena.capacity
    await assert_invariant(server)


async def test_openai_sdk_through_offload_to_two_ranks(aiohttp_server: Any, engine_url: str) -> None:
    server = await sidecar(aiohttp_server, engine_url)
    base = str(server.make_url("/v1"))
    images = [jpeg(320, 240, 1), jpeg(200, 500, 2), jpeg(64, 64, 3), jpeg(640, 360, 4)]
    client = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0, timeout=120)

    async def image_request(data: bytes, stream: bool) -> tuple[str, list[Any]]:
        url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
        messages: Any = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            }
        ]
        if stream:
            raw = await client.chat.completions.with_raw_response.create(
                model="tiny", messages=messages, max_tokens=3, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        else:
            raw = await client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=3)
            text = raw.parse().choices[0].message.content or ""
        return text, json.loads(raw.headers["x-mm-tensor-sha256"])

    async def text_request(stream: bool) -> str:
        messages: Any = [{"role": "user", "content": "hello"}]
        if stream:
            chunks = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        done = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
        return done.choices[0].message.content or ""

    async with client:
        results = await asyncio.gather(
            *(image_request(data, stream=i % 2 == 1) for i, data in enumerate(images)),
            text_request(stream=False),
            text_request(stream=True),
        )
    for (text, per_rank), data in zip(results[:4], images, strict=True):
        assert isinstance(text, str)
        want = expected_sums(data)
        # Both ranks hold exactly what the processor produced for this image.
        assert per_rank == [[want], [want]]
    assert all(isinstance(r, str) for r in results[4:])
    await assert_idle(server)


async def test_uint8_pixels_give_the_float32_answers_in_a_quarter_of_the_bytes(
    aiohttp_server: Any, engine_url: str
) -> None:
    """preprocess.transport_dtype uint8: the workers write the processor's raw patches, both ranks get
    exactly those bytes, normalise them themselves (bit for bit transformers' float32) and answer what
    the float32 sidecar's requests get; the sidecar prices a quarter of the bytes. bfloat16: the ranks
    get the processor's float32 rounded as torch rounds them, priced at half the bytes, and the
    prompts are those of float32 (the answers may differ: the pixels do)."""
    images = [jpeg(320, 240, 11), jpeg(200, 500, 12), jpeg(333, 517, 13)]
    answers: dict[str, list[tuple[str, int]]] = {}
    for pixels in ("float32", "uint8", "bfloat16"):
        server = await sidecar(aiohttp_server, engine_url, pixels)
        got = []
        async with aiohttp.ClientSession() as http:
            for data in images:
                url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
                body = {
                    "model": "tiny",
                    "max_tokens": 6,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": url}},
                                {"type": "text", "text": "?"},
                            ],
                        }
                    ],
                }
                async with http.post(server.make_url("/v1/chat/completions"), json=body) as resp:
                    answer = await resp.json()
                    assert resp.status == 200, answer
                    sums = json.loads(resp.headers["x-mm-tensor-sha256"])
                outputs = run_processor(load_processor("qwen2-vl"), decode(data), raw=pixels == "uint8")
                if pixels == "bfloat16":
                    outputs["pixel_values"] = bfloat16_bits(outputs["pixel_values"])
                want = {n: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for n, a in outputs.items()}
                assert sums == [[want], [want]], pixels  # each rank holds exactly these bytes
                got.append((answer["choices"][0]["message"]["content"], answer["usage"]["prompt_tokens"]))
        # The gate priced each image at its tensors' bytes in this dtype.
        priced = server.app[SPEC].pixel_dtype
        assert priced == pixels
        await assert_idle(server)
        answers[pixels] = got
    assert answers["uint8"] == answers["float32"], answers
    assert [tokens for _, tokens in answers["bfloat16"]] == [tokens for _, tokens in answers["float32"]]
    bf16 = output_nbytes(
        dataclasses.replace(read_spec(resolve_processor("qwen2-vl")), pixel_dtype="bfloat16"), 333, 517
    )
    f32 = output_nbytes(dataclasses.replace(read_spec(resolve_processor("qwen2-vl")), pixel_dtype="float32"), 333, 517)
    u8 = output_nbytes(dataclasses.replace(read_spec(resolve_processor("qwen2-vl")), pixel_dtype="uint8"), 333, 517)
    assert u8 < f32 / 3.9, (u8, f32)  # pixel_values a quarter, plus the 24-byte grid
    assert f32 / 2.01 < bf16 < f32 / 1.99, (bf16, f32)


async def test_anthropic_and_responses_translated_with_images(aiohttp_server: Any, engine_url: str) -> None:
    server = await sidecar(aiohttp_server, engine_url)
    data = jpeg(256, 256, 5)
    b64 = base64.b64encode(data).decode()
    ac = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="k", max_retries=0)
    block: Any = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": b64}}
    async with ac:
        msg = await ac.messages.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [block]}])
        assert msg.type == "message" and msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3
        async with ac.messages.stream(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [block]}]) as s:
            final = await s.get_final_message()
        assert final.usage.output_tokens == 2
    oc = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0)
    content: Any = [{"type": "input_image", "image_url": "data:image/jpeg;base64," + b64}]
    async with oc:
        resp = await oc.responses.create(
            model="tiny", input=[{"role": "user", "content": content}], max_output_tokens=2
        )
        assert resp.status == "incomplete" and resp.usage is not None and resp.usage.output_tokens == 2
    await assert_idle(server)


async def test_engine_rejects_bad_and_stale_descriptors_before_reading(engine_url: str) -> None:
    from preprocess.arena import Arena, segment_name

    arena = Arena.create(segment_name(f"e2e-stale-{os.getpid()}"), 4 * 1024**2)
    try:
        extent = arena.reserve(32768)
        assert extent is not None
        grid = arena.write(extent, 0, np.array([[1, 2, 2]], dtype=np.int64))
        pixels = arena.write(extent, 64, np.zeros((4, 1176), dtype=np.float32))
        arena.publish(extent)
        # Signed with the segment's key, so that the MAC passes and the generation and bounds checks
        # are what refuse them; the answer must not say which, nor anything about the arena.
        key = arena.header.key
        stale = dataclasses.replace(grid, generation=grid.generation + 1).signed(key)
        outside = dataclasses.replace(grid, offset=arena.size + 4096).signed(key)
        async with aiohttp.ClientSession() as http:
            for desc in (stale, outside):
                part = {
                    "type": "image_tensors",
                    "tensors": {"pixel_values": pixels.to_json(), "image_grid_thw": desc.to_json()},
                }
                status, message, headers, text = await engine_chat(http, engine_url, [part])
                assert status == 400 and message == DESCRIPTOR_ERROR, text
                assert "x-mm-tensor-sha256" not in headers
                for secret in (arena.name, str(arena.size), str(grid.generation), str(desc.offset), "generation"):
                    assert secret not in text, (secret, text)
        arena.free(extent)
    finally:
        arena.close()


async def engine_chat(
    http: aiohttp.ClientSession, engine: str, parts: list[dict[str, Any]]
) -> tuple[int, str | None, dict[str, str], str]:
    """POST one user message of `parts` to the engine itself: (status, error message, headers, body)."""
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}
    async with http.post(engine + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(60)) as resp:
        text = await resp.text()
        message = None
        if resp.status != 200:
            message = json.loads(text)["error"]["message"]
        return resp.status, message, {k.lower(): v for k, v in resp.headers.items()}, text


class HoldingHop:
    """Between the sidecar and the engine: records each chat request's body and holds it (the victim's
    extent stays live) until released. Everything else passes through."""

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.bodies: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 28)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.Response:
        data = await request.read()
        if request.method == "POST" and request.path == "/v1/chat/completions":
            self.bodies.append(json.loads(data))
            self.arrived.set()
            await self.release.wait()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        async with (
            aiohttp.ClientSession() as http,
            http.request(request.method, self.engine + request.path_qs, data=data or None, headers=headers) as resp,
        ):
            payload = await resp.read()
            keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "x-mm-tensor-sha256")}
            return web.Response(status=resp.status, body=payload, headers=keep)


async def test_forged_descriptors_for_a_live_extent_get_the_fixed_refusal_and_read_nothing(
    aiohttp_server: Any, engine_url: str
) -> None:
    from preprocess.arena import Arena, segment_name

    hop = HoldingHop(engine_url)
    hop_server = await aiohttp_server(hop.app())
    server = await sidecar(aiohttp_server, str(hop_server.make_url("")).rstrip("/"))
    data = jpeg(320, 240, 11)
    want = expected_sums(data)
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    victim_body = {
        "model": "tiny",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
    }
    pid = os.getpid()
    evil = Arena.create(segment_name(f"e2eevil{pid}"), 1024**2)  # the attacker's own segment and key
    fifo = f"/dev/shm/mm-sidecar-e2efifo{pid}-1"
    junk = f"/dev/shm/mm-sidecar-e2ejunk{pid}-1"
    foreign = f"/dev/shm/e2e-foreign-{pid}"
    os.mkfifo(fifo, 0o600)
    for path in (junk, foreign):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"PRIVATE!" * 4096)
        os.close(fd)
    try:
        async with aiohttp.ClientSession() as http:
            victim = asyncio.create_task(http.post(server.make_url("/v1/chat/completions"), json=victim_body))
            await asyncio.wait_for(hop.arrived.wait(), 60)
            # The victim's request is held between the sidecar and the engine: its extent is live.
            (part,) = [p for p in hop.bodies[0]["messages"][0]["content"] if p["type"] == "image_tensors"]
            genuine: dict[str, dict[str, Any]] = part["tensors"]
            fields = {n: TensorDescriptor.from_json(d) for n, d in genuine.items()}
            victim_segment = fields["pixel_values"].shm

            def forge(change: Any) -> dict[str, Any]:
                return {"type": "image_tensors", "tensors": {n: change(n, d) for n, d in genuine.items()}}

            forgeries = {
                "random mac": forge(lambda n, d: {**d, "mac": secrets.token_hex(32)}),
                "no mac": forge(lambda n, d: {k: v for k, v in d.items() if k != "mac"}),
                "wrong key": forge(lambda n, d: fields[n].signed(secrets.token_bytes(32)).to_json()),
                "another segment's key": forge(lambda n, d: fields[n].signed(evil.header.key).to_json()),
                "one tensor forged": forge(
                    lambda n, d: {**d, "mac": secrets.token_hex(32)} if n == "pixel_values" else d
                ),
                "extra field": forge(lambda n, d: {**d, "sig": d["mac"]}),
            }
            probes = {  # names that ask the engine about /dev/shm rather than about the victim
                "fifo": forge(lambda n, d: {**d, "shm": os.path.basename(fifo)}),
                "not an arena": forge(lambda n, d: {**d, "shm": os.path.basename(junk)}),
                "not a segment name": forge(lambda n, d: {**d, "shm": os.path.basename(foreign)}),
                "no such segment": forge(lambda n, d: {**d, "shm": f"mm-sidecar-nobody{pid}-1"}),
            }
            answers = set()
            for label, forged in {**forgeries, **probes}.items():
                status, message, headers, text = await engine_chat(http, engine_url, [forged])
                assert status == 400 and message == DESCRIPTOR_ERROR, (label, text)
                assert "x-mm-tensor-sha256" not in headers, label  # no rank copied anything for it
                for secret in (victim_segment, str(fields["pixel_values"].generation), "PRIVATE", "magic", "mode"):
                    assert secret not in text, (label, secret, text)
                answers.add(text)
            assert len(answers) == 1  # the same bytes whatever the cause
            assert not victim.done()  # the victim's request is still held: the extent was live throughout

            # The control: the same extent with the sidecar's MAC is read by both ranks, so the forgeries
            # were refused for their MAC alone; and the model thread, which opened the FIFO's name, is
            # not stuck. (Replaying a genuine descriptor needs the descriptor, which only the sidecar
            # and the engine see, and works only while its extent is live.)
            status, _, headers, text = await engine_chat(http, engine_url, [part])
            assert status == 200, text
            assert json.loads(headers["x-mm-tensor-sha256"]) == [[want], [want]]

            hop.release.set()
            async with await victim as resp:
                assert resp.status == 200, await resp.text()
                assert json.loads(resp.headers["x-mm-tensor-sha256"]) == [[want], [want]]
            await assert_idle(server)
            # After the victim's ack the sidecar freed the extent: the genuine descriptor is stale now.
            status, message, headers, text = await engine_chat(http, engine_url, [part])
            assert status == 400 and message == DESCRIPTOR_ERROR, text
            assert "x-mm-tensor-sha256" not in headers
    finally:
        hop.release.set()
        evil.close()
        for path in (fifo, junk, foreign):
            os.unlink(path)


async def test_the_sidecar_refuses_image_tensors_parts_from_clients(aiohttp_server: Any, engine_url: str) -> None:
    # A client-sent descriptor never reaches the engine: the sidecar refuses its own internal part type
    # (sidecar/classify.py). Genuine here, signed by a real segment, so only that refusal can stop it.
    from preprocess.arena import Arena, segment_name

    server = await sidecar(aiohttp_server, engine_url)
    arena = Arena.create(segment_name(f"e2e-client-{os.getpid()}"), 1024**2)
    try:
        extent = arena.reserve(64)
        assert extent is not None
        desc = arena.write(extent, 0, np.zeros(16, dtype=np.float32))
        arena.publish(extent)
        part = {"type": "image_tensors", "tensors": {"pixel_values": desc.to_json()}}
        body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]}
        async with (
            aiohttp.ClientSession() as http,
            http.post(server.make_url("/v1/chat/completions"), json=body) as resp,
        ):
            text = await resp.text()
            assert resp.status == 400, text
            assert "image_tensors" in json.loads(text)["error"]["message"], text
        arena.free(extent)
    finally:
        arena.close()
    await assert_idle(server)


async def test_usage_counts_the_prompt_the_model_read(aiohttp_server: Any, engine_url: str) -> None:
    # prompt_tokens is the prompt after the image placeholders are expanded: two requests that differ
    # only in their image differ by exactly the difference in image tokens (patches / merge_size^2),
    # which the processor decides independently of the engine.
    server = await sidecar(aiohttp_server, engine_url)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0, timeout=120)
    processor = load_processor("qwen2-vl")
    prompts, image_tokens = [], []
    async with client:
        for data in (jpeg(320, 240, 5), jpeg(640, 480, 6)):
            url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
            content: Any = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
            done = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2
            )
            assert done.usage is not None
            assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
            prompts.append(done.usage.prompt_tokens)
            patches = run_processor(processor, decode(data))["pixel_values"].shape[0]
            image_tokens.append(patches // processor.merge_size**2)
    assert prompts[0] > image_tokens[0] > 0
    assert prompts[1] - prompts[0] == image_tokens[1] - image_tokens[0]
    await assert_idle(server)
