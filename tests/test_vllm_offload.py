"""The vLLM tier, offload mode: the sidecar preprocesses, real vLLM (`mm-sidecar vllm-engine`, the plugin
of engine/vllm_offload.py) copies the tensors out of the arena and never runs its own image processor.

One vllm-engine serves the module: the tiny Qwen2-VL with two tensor-parallel ranks (TP=2, vLLM's CPU
backend runs it here), so the design is checked where it matters: vLLM's API server alone reads the
arena and its own transport carries the tensors to both ranks. The session's `vllm_server` (the same
checkpoint, plain vLLM, TP=1) is the reference for "vLLM processing the image itself". The module's
sidecar sends uint8 pixels (`preprocess.transport_dtype: uint8`, `vllm-engine --pixels uint8`): vLLM
normalises them on the device, as it does for the images it processes itself. Float32 pixels at TP=1
are what `tests/test_bench_smoke.py` runs through the benchmark. Every claim about vLLM
is observed from vLLM's side: its answers (greedy `token_ids` via `return_token_ids`,
`prompt_token_ids`, `usage`), its /health, and the plugin's probe log in vLLM's API server process
(one line per HF-processor call and per arena copy).

Images are PNGs whose sides are multiples of 28 (patch 14 x merge 2): neither processor resizes them.
The sidecar's processor runs transformers' PIL backend, vLLM's the torchvision one; they resize
differently (up to 0.045 apart on a resized image) but, without a resize, differ only in the rounding
of the normalisation (measured: 2.4e-7), so token ids and prompt tokens are compared exactly and
logprobs to 1e-4 (measured: 4.8e-7).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import numpy as np
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from bench.services import REPO, Service, vllm_engine, vllm_python
from engine.vllm_offload import UnsupportedVLLM, check_vllm_version
from mm_sidecar import vllm_engine as cli
from preprocess.processors import decode, load_processor, raw_normalisation, run_processor
from preprocess.protocol import DESCRIPTOR_ERROR, shm_token
from sidecar.app import create_app
from sidecar.app_keys import PIPELINE, POOL, STATE

from .conftest import assert_invariant, make_config, vllm_metrics

MODEL = "tiny"
SIZES = ((336, 224), (448, 336))  # multiples of 28: no resize in either processor
PROMPT = "Describe the image."
LOGPROB_TOLERANCE = 1e-4
TP = 2
PIXELS = "uint8"  # preprocess.transport_dtype / vllm-engine --pixels


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return buf.getvalue()


def png_url(width: int, height: int, seed: int) -> str:
    return "data:image/png;base64," + base64.b64encode(png(width, height, seed)).decode()


def chat_body(
    images: list[str], *, stream: bool = False, max_tokens: int = 8, text: bool = True, **extra: Any
) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    if text:
        parts.append({"type": "text", "text": PROMPT})
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens}
    return {**body, "temperature": 0, "stream": stream, **extra}


@dataclass
class Offload:
    service: Service
    model: Path
    probe: Path

    @property
    def url(self) -> str:
        return self.service.url

    def mark(self) -> int:
        return len(self.lines())

    def lines(self, since: int = 0) -> list[str]:
        text = self.probe.read_text() if self.probe.exists() else ""
        return text.splitlines()[since:]


def model_root(url: str) -> Path:
    """The checkpoint directory a vLLM serves (its /v1/models `root`)."""
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
        return Path(json.load(resp)["data"][0]["root"])


@pytest.fixture(scope="module")
def offload(vllm_server: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Offload]:
    """vllm-engine on the very checkpoint `vllm_server` serves (its /v1/models root)."""
    model = model_root(vllm_server.url)
    logs = tmp_path_factory.mktemp("vllm-engine")
    probe = logs / "probe.log"
    with vllm_engine(model, logs, tp=TP, pixels=PIXELS, probe_log=probe) as service:
        yield Offload(service, model, probe)


def process_titles(pgid: int) -> list[str]:
    """The process titles (argv[0], which vLLM sets to `VLLM::...`) of process group `pgid`."""
    titles = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == pgid:
                titles.append(Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
        except OSError:  # gone meanwhile
            continue
    return titles


class Hop:
    """Between the sidecar and vllm-engine: records each chat request's body, holds it while `release` is
    clear, then relays it and records vLLM's status and answer. The relay runs on even if the sidecar
    hangs up (as a client's disconnect makes it do), so a test sees what vLLM made of the request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.bodies: list[dict[str, Any]] = []
        self.answers: list[tuple[int, bytes]] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.relays: list[asyncio.Task[tuple[int, str, bytes]]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 28)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.Response:
        data = await request.read()
        chat = request.method == "POST" and request.path == "/v1/chat/completions"
        if chat:
            self.bodies.append(json.loads(data))
            self.arrived.set()
        relay = asyncio.ensure_future(self._relay(request.method, request.path_qs, data, chat))
        self.relays.append(relay)
        status, content_type, payload = await asyncio.shield(relay)
        return web.Response(status=status, body=payload, content_type=content_type)

    async def _relay(self, method: str, path_qs: str, data: bytes, chat: bool) -> tuple[int, str, bytes]:
        if chat:
            await self.release.wait()
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.upstream + path_qs, data=data or None, headers=JSON) as resp,
        ):
            payload = await resp.read()
        if chat:
            self.answers.append((resp.status, payload))
        return resp.status, resp.content_type, payload


JSON = {"content-type": "application/json"}


async def sidecar(aiohttp_server: Any, engine_url: str, model: Path, **sections: dict[str, Any]) -> TestServer:
    base: dict[str, dict[str, Any]] = {
        "upstream": {"mode": "offload", "engine": "vllm", "ack_timeout_s": 120, "connect_timeout_s": 5},
        "preprocess": {"processor": str(model), "workers": 1, "transport_dtype": PIXELS},
        "gate": {"max_concurrent": 2, "max_bytes": "64MiB"},
        "shm": {"name": f"vllmoff-{os.getpid()}"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    server: TestServer = await aiohttp_server(create_app(make_config(engine_url, **base)))
    async with asyncio.timeout(60):
        while not server.app[STATE].engine_verified:
            await asyncio.sleep(0.05)
    return server


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(120)) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        answer: dict[str, Any] = json.loads(text)
        return answer


async def post_stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat answer gathered: its text, token ids and usage."""
    text, token_ids, usage = "", [], None
    async with http.post(url + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(120)) as resp:
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                text += choice["delta"].get("content") or ""
                token_ids += choice.get("token_ids") or []
    return {"text": text, "token_ids": token_ids, "usage": usage}


def summary(answer: dict[str, Any]) -> dict[str, Any]:
    choice = answer["choices"][0]
    return {
        "token_ids": choice["token_ids"],
        "text": choice["message"]["content"],
        "prompt_token_ids": answer["prompt_token_ids"],
        "prompt_tokens": answer["usage"]["prompt_tokens"],
        "logprobs": [t["logprob"] for t in choice["logprobs"]["content"]],
    }


def image_token_id(model: Path) -> int:
    token: int = json.loads((model / "config.json").read_text())["image_token_id"]
    return token


def hf_calls(lines: list[str]) -> list[str]:
    return [line for line in lines if "call_hf_processor" in line or "preprocess" in line]


# --------------------------------------------------------------------------------------------------
# Parity: offloaded answers are vLLM's answers for the image it would have processed itself


async def test_offloaded_answers_equal_vllm_processing_the_images_itself(
    offload: Offload, vllm_server: Service, aiohttp_server: Any
) -> None:
    # /health carries the token of this machine's /dev/shm; the sidecar verifies it and goes ready.
    async with aiohttp.ClientSession() as http, http.get(offload.url + "/health") as resp:
        assert resp.status == 200
        shm = {"dir": "/dev/shm", "token": shm_token("/dev/shm"), "pixels": [PIXELS]}
        assert await resp.json() == {"status": "ok", "shm": shm}
    # Two tensor-parallel ranks really serve it (vLLM titles its processes).
    workers = sorted(t for t in process_titles(os.getpgid(offload.service.pid)) if t.startswith("VLLM::Worker"))
    assert workers == [f"VLLM::Worker_TP{rank}" for rank in range(TP)], workers
    hop = Hop(offload.url)
    hop_server = await aiohttp_server(hop.app())
    server = await sidecar(aiohttp_server, url_of(hop_server), offload.model)
    extra = {"return_token_ids": True, "logprobs": True}
    cases = {  # label -> (images, with a text part)
        "one image": ([png_url(*SIZES[0], seed=1)], True),
        "two images": ([png_url(*SIZES[0], seed=2), png_url(*SIZES[1], seed=3)], True),
        # No text part: vLLM's request validation takes another path (engine/vllm_offload.py hook 3).
        "an image alone": ([png_url(*SIZES[1], seed=7)], False),
    }
    async with aiohttp.ClientSession() as http:
        async with http.get(url_of(server) + "/readyz") as resp:
            assert resp.status == 200, await resp.text()
        for label, (images, text) in cases.items():
            mark = offload.mark()
            through = summary(await post(http, url_of(server), chat_body(images, text=text, **extra)))
            copies = offload.lines(mark)
            direct = summary(await post(http, vllm_server.url, chat_body(images, text=text, **extra)))
            itself = summary(await post(http, offload.url, chat_body(images, text=text, **extra)))
            usage = {"stream_options": {"include_usage": True}}
            body = chat_body(images, stream=True, text=text, **extra, **usage)
            streamed = await post_stream(http, url_of(server), body)

            # vLLM's API server copied each image out of the arena and never ran its image processor.
            assert hf_calls(copies) == [], (label, copies)
            assert len([line for line in copies if "arena_copy" in line]) == len(images), (label, copies)
            # Only the API server (the pid vllm-engine exec'd) reads the arena, never a rank.
            readers = {int(pid) for pid in re.findall(r"pid=(\d+) arena_copy", "\n".join(copies))}
            assert readers == {offload.service.pid}, (label, readers, offload.service.pid)
            # uint8 patches: one byte per value, a quarter of the float32 transport.
            copied = re.findall(r"pixel_values=\[(\d+), (\d+)\].*?nbytes=(\d+)", "\n".join(copies))
            sizes = [(int(n), int(v), int(b)) for n, v, b in copied]
            assert sizes and all(b == n * v for n, v, b in sizes), (label, sizes)
            # The same request as data URLs, to the same vllm-engine: its processor runs.
            assert hf_calls(offload.lines(mark)), label

            for reference in (direct, itself):
                assert through["token_ids"] == reference["token_ids"], (label, through, reference)
                assert through["prompt_token_ids"] == reference["prompt_token_ids"], label
                assert through["prompt_tokens"] == reference["prompt_tokens"], label
                assert through["text"] == reference["text"], label
                gap = max(abs(a - b) for a, b in zip(through["logprobs"], reference["logprobs"], strict=True))
                assert gap < LOGPROB_TOLERANCE, (label, gap)
            assert streamed["token_ids"] == through["token_ids"] and streamed["text"] == through["text"], label
            assert streamed["usage"]["prompt_tokens"] == through["prompt_tokens"], label
            # The prompt holds t*h*w/merge² image pads per image, from the grids vLLM copied.
            grids = [
                [int(n) for n in re.findall(r"\d+", m)] for m in re.findall(r"grid=\[([\d, ]+)\]", "".join(copies))
            ]
            pads = through["prompt_token_ids"].count(image_token_id(offload.model))
            assert pads == sum(t * h * w // 4 for t, h, w in grids) > 0, (label, pads, grids)
            print(
                f"\n{label}: prompt_tokens {through['prompt_tokens']} (image pads {pads}, grids {grids}), "
                f"token_ids {through['token_ids']}, logprob gap vs vllm_server "
                f"{max(abs(a - b) for a, b in zip(through['logprobs'], direct['logprobs'], strict=True)):.2e}"
            )
    # The non-streaming requests reached vLLM as streams (its headers, sent after the copy, are the ack).
    sent = [(b.get("stream"), (b.get("stream_options") or {}).get("include_usage")) for b in hop.bodies]
    assert sent == [(True, True)] * 2 * len(cases), sent
    parts = [p["type"] for p in hop.bodies[2]["messages"][0]["content"]]
    assert parts == ["image_tensors", "image_tensors", "text"]
    await assert_invariant(server)


async def test_sdks_through_offload_stream_and_not(offload: Offload, vllm_server: Service, aiohttp_server: Any) -> None:
    server = await sidecar(aiohttp_server, offload.url, offload.model)
    url = png_url(*SIZES[0], seed=4)
    b64 = url.split(",", 1)[1]
    messages: Any = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}],
        }
    ]
    oai = openai.AsyncOpenAI(base_url=url_of(server) + "/v1", api_key="k", max_retries=0, timeout=120)
    direct = openai.AsyncOpenAI(base_url=vllm_server.url + "/v1", api_key="k", max_retries=0, timeout=120)
    async with oai, direct:
        reference = await direct.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        done = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        assert done.choices[0].message.content == reference.choices[0].message.content
        assert done.usage is not None and reference.usage is not None
        assert done.usage.prompt_tokens == reference.usage.prompt_tokens > 96  # 96 image tokens in it
        assert done.usage.completion_tokens == 4
        stream = await oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == reference.choices[0].message.content

        content: Any = [{"type": "input_image", "image_url": url}, {"type": "input_text", "text": PROMPT}]
        resp = await oai.responses.create(
            model=MODEL, input=[{"role": "user", "content": content}], max_output_tokens=4, temperature=0
        )
        assert resp.output_text == reference.choices[0].message.content
        assert resp.usage is not None and resp.usage.input_tokens == reference.usage.prompt_tokens

    block: Any = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
        {"type": "text", "text": PROMPT},
    ]
    ant = anthropic.AsyncAnthropic(base_url=url_of(server), api_key="k", max_retries=0, timeout=120)
    async with ant:
        # This anthropic SDK has no `temperature` argument any more; the API still takes it.
        greedy: Any = {"temperature": 0}
        msg = await ant.messages.create(
            model=MODEL, max_tokens=4, extra_body=greedy, messages=[{"role": "user", "content": block}]
        )
        assert msg.type == "message" and msg.stop_reason == "max_tokens"
        assert msg.content[0].type == "text" and msg.content[0].text == reference.choices[0].message.content
        assert msg.usage.input_tokens == reference.usage.prompt_tokens and msg.usage.output_tokens == 4
        async with ant.messages.stream(
            model=MODEL, max_tokens=4, extra_body=greedy, messages=[{"role": "user", "content": block}]
        ) as events:
            final = await events.get_final_message()
        assert final.content[0].type == "text" and final.content[0].text == msg.content[0].text
        assert final.usage.output_tokens == 4

    # A client's own image_tensors part never reaches vLLM.
    forged = {"type": "image_tensors", "tensors": {"pixel_values": {"shm": "mm-sidecar-x-1", "offset": 0}}}
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": [forged]}]}
    async with aiohttp.ClientSession() as http, http.post(url_of(server) + "/v1/chat/completions", json=body) as r:
        error = (await r.json())["error"]
        assert r.status == 400 and error["code"] == "forbidden_part", error
    await assert_invariant(server)


# --------------------------------------------------------------------------------------------------
# Refusals: forged and stale descriptors straight to vllm-engine's port


async def test_forged_and_stale_descriptors_get_the_fixed_refusal_and_vllm_stays_healthy(offload: Offload) -> None:
    from preprocess.arena import Arena, segment_name
    from preprocess.extents import pack_tensors
    from preprocess.protocol import segment_size_for

    processor = load_processor(str(offload.model))
    image = decode(png(*SIZES[0], seed=5))
    outputs = run_processor(processor, image, raw=True)
    normalize = raw_normalisation(processor)
    arrays = [np.ascontiguousarray(outputs["pixel_values"]), np.ascontiguousarray(outputs["image_grid_thw"])]
    floats = np.ascontiguousarray(run_processor(processor, image)["pixel_values"])
    arena = Arena.create(segment_name(f"vllmoff-direct-{os.getpid()}"), segment_size_for(8 << 20))
    evil = Arena.create(segment_name(f"vllmoff-evil-{os.getpid()}"), segment_size_for(1 << 20))
    try:
        offsets, total = pack_tensors([a.nbytes for a in arrays])
        extent = arena.reserve(total)
        assert extent is not None
        pixels, grid = (arena.write(extent, off, a) for off, a in zip(offsets, arrays, strict=True))
        arena.publish(extent, total)
        key = arena.header.key

        def part(pv: Any = pixels, g: Any = grid, norm: Any = normalize, **edit: Any) -> dict[str, Any]:
            tensors = {"pixel_values": pv.to_json(), "image_grid_thw": g.to_json()}
            for name, change in edit.items():
                tensors[name] = change(tensors[name])
            made = {"type": "image_tensors", "tensors": tensors}
            return made if norm is None else {**made, "normalize": norm}

        forgeries = {
            "stale generation": part(g=dataclasses.replace(grid, generation=grid.generation + 1).signed(key)),
            "outside the segment": part(g=dataclasses.replace(grid, offset=arena.size + 4096).signed(key)),
            "offset moved, old MAC": part(pixel_values=lambda d: {**d, "offset": d["offset"] + 4096}),
            "random MAC": part(pixel_values=lambda d: {**d, "mac": secrets.token_hex(32)}),
            "another segment's key": part(pv=pixels.signed(evil.header.key)),
            "no such segment": part(image_grid_thw=lambda d: {**d, "shm": f"mm-sidecar-nobody{os.getpid()}-1"}),
            "not a segment name": part(image_grid_thw=lambda d: {**d, "shm": "../etc/passwd"}),
        }
        async with aiohttp.ClientSession() as http:
            answers = set()
            for label, forged in forgeries.items():
                status, text = await engine_chat(http, offload.url, [forged])
                assert status == 400 and json.loads(text)["error"]["message"] == DESCRIPTOR_ERROR, (label, text)
                for secret in (arena.name, str(grid.generation), str(pixels.offset), "generation", "mac"):
                    assert secret not in text, (label, secret, text)
                answers.add(text)
            assert len(answers) == 1, answers  # the same bytes whatever the cause
            # The control: the genuine descriptors are read (so the MAC alone refused the forgeries).
            status, text = await engine_chat(http, offload.url, [part()])
            assert status == 200, text
            # An authentic descriptor whose grid does not match its pixels: refused before the encoder.
            bad_grid = np.array([[1, 16, 26]], dtype=np.int64)
            other = arena.reserve(64)
            assert other is not None
            wrong = arena.write(other, 0, bad_grid)
            arena.publish(other)
            status, text = await engine_chat(http, offload.url, [part(g=wrong)])
            assert status == 400 and "do not match" in text, text
            arena.free(other)
            # uint8 pixels need the normalisation vLLM applies, and float32 ones are the wrong dtype here.
            other_std = {**normalize, "image_std": [0.5, 0.5, 0.5]}
            for label, bad in (("another std", part(norm=other_std)), ("no normalisation", part(norm=None))):
                status, text = await engine_chat(http, offload.url, [bad])
                assert status == 400 and "image_tensors.normalize" in text, (label, text)
            spare = arena.reserve(floats.nbytes)
            assert spare is not None
            as_floats = arena.write(spare, 0, floats)
            arena.publish(spare)
            status, text = await engine_chat(http, offload.url, [part(pv=as_floats, norm=None)])
            assert status == 400 and "do not match" in text and "uint8" in text, text
            arena.free(spare)
            # Freed (as after an ack): the genuine descriptors are stale now.
            arena.free(extent)
            status, text = await engine_chat(http, offload.url, [part()])
            assert status == 400 and json.loads(text)["error"]["message"] == DESCRIPTOR_ERROR, text
            # EngineCore is alive: /health and a real request still answer.
            async with http.get(offload.url + "/health") as resp:
                assert resp.status == 200
            status, text = await engine_chat(http, offload.url, [{"type": "text", "text": "hi"}])
            assert status == 200, text
    finally:
        arena.close()
        evil.close()


async def engine_chat(http: aiohttp.ClientSession, url: str, parts: list[dict[str, Any]]) -> tuple[int, str]:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}
    async with http.post(url + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(60)) as resp:
        return resp.status, await resp.text()


# --------------------------------------------------------------------------------------------------
# The ack: a client that leaves between the handoff and vLLM's headers


async def test_client_disconnect_between_handoff_and_ack_leaves_nothing(offload: Offload, aiohttp_server: Any) -> None:
    hop = Hop(offload.url)
    hop.release.clear()
    hop_server = await aiohttp_server(hop.app())
    server = await sidecar(aiohttp_server, url_of(hop_server), offload.model)
    async with aiohttp.ClientSession() as http:
        body = chat_body([png_url(*SIZES[0], seed=6)])
        task = asyncio.create_task(post(http, url_of(server), body))
        await asyncio.wait_for(hop.arrived.wait(), 60)
        # The descriptors are on their way to vLLM, which has not answered: the extent is live.
        assert server.app[PIPELINE].stats()[0].extents == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await assert_invariant(server)  # no lease, no extent
        # vLLM gets the descriptors only now: they are stale, it reads nothing and says so.
        mark = offload.mark()
        hop.release.set()
        deadline = time.monotonic() + 60
        while not hop.answers:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        status, error = hop.answers[0]
        assert status == 400 and json.loads(error)["error"]["message"] == DESCRIPTOR_ERROR, (status, error)
        assert not [line for line in offload.lines(mark) if "arena_copy" in line]
        async with http.get(offload.url + "/health") as resp:
            assert resp.status == 200


async def test_a_sidecar_sending_other_pixels_than_vllm_takes_refuses_to_start(
    offload: Offload, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """vllm-engine --pixels uint8 lists its dtype in /health; a float32 sidecar checks it before it sends
    a descriptor, and stops (exit 2) with a message that says how to fix it, instead of 400 per request."""
    other = "float32" if PIXELS == "uint8" else "uint8"
    config = make_config(
        offload.url,
        upstream={"mode": "offload", "engine": "vllm"},
        preprocess={"processor": str(offload.model), "workers": 1, "transport_dtype": other},
        shm={"name": f"vllmoff-px-{os.getpid()}"},
    )
    server: TestServer = await aiohttp_server(create_app(config))
    state = server.app[STATE]
    await asyncio.wait_for(state.stop.wait(), 60)
    assert state.exit_code == 2 and not state.engine_verified
    refusal = [r.getMessage() for r in caplog.records if "offload mode refused" in r.getMessage()]
    assert refusal and f"--pixels {other}" in refusal[0] and repr([PIXELS]) in refusal[0], refusal


# --------------------------------------------------------------------------------------------------
# The ack timeout, with a queue behind it


async def test_an_ack_timeout_passes_the_slot_on_and_vllm_reads_nothing_stale(
    offload: Offload, aiohttp_server: Any
) -> None:
    """vLLM does not answer the first request within `ack_timeout_s` (the hop holds it) while two more
    wait in the gate's queue: the first gets 504 naming the limit, its slot and extent go at once to the
    queue, and its descriptors, reaching vLLM only afterwards, are stale: vLLM copies nothing for them."""
    hop = Hop(offload.url)
    hop.release.clear()
    hop_server = await aiohttp_server(hop.app())
    ack_timeout_s = 4
    server = await sidecar(
        aiohttp_server,
        url_of(hop_server),
        offload.model,
        upstream={"ack_timeout_s": ack_timeout_s},
        gate={"max_concurrent": 1, "queue_timeout_s": 120},
    )
    bodies = [chat_body([png_url(*SIZES[0], seed=20 + i)], max_tokens=2) for i in range(3)]
    async with aiohttp.ClientSession() as http:

        async def send(body: dict[str, Any]) -> tuple[int, Any]:
            url = url_of(server) + "/v1/chat/completions"
            async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(120)) as resp:
                return resp.status, await resp.json()

        first = asyncio.create_task(send(bodies[0]))
        await asyncio.wait_for(hop.arrived.wait(), 60)
        rest = [asyncio.create_task(send(body)) for body in bodies[1:]]
        deadline = time.monotonic() + 30
        while server.app[POOL].stats().queued != 2:
            assert time.monotonic() < deadline, server.app[POOL].stats()
            await asyncio.sleep(0.02)
        status, answer = await asyncio.wait_for(first, ack_timeout_s + 30)
        assert status == 504, answer
        assert answer["error"]["code"] == "upstream_timeout", answer
        assert f"upstream.ack_timeout_s={ack_timeout_s}" in answer["error"]["message"], answer
        # The slot went to the queue: the next request is on its way to vLLM (held by the hop).
        deadline = time.monotonic() + 60
        while len(hop.bodies) < 2:
            assert time.monotonic() < deadline, "the queued request was not forwarded after the timeout"
            await asyncio.sleep(0.02)
        assert server.app[POOL].stats().queued == 1
        mark = offload.mark()
        hop.release.set()
        done = await asyncio.wait_for(asyncio.gather(*rest), 120)
        assert [s for s, _ in done] == [200, 200], done
        assert all(a["usage"]["prompt_tokens"] > 96 for _, a in done), done
        deadline = time.monotonic() + 60
        while len(hop.answers) < 3:
            assert time.monotonic() < deadline, hop.answers
            await asyncio.sleep(0.05)
    # The timed-out request's descriptors were stale when vLLM got them: the fixed refusal, no copy.
    refused = [json.loads(p)["error"]["message"] for s, p in hop.answers if s == 400]
    assert refused == [DESCRIPTOR_ERROR], hop.answers
    copies = [line for line in offload.lines(mark) if "arena_copy" in line]
    assert len(copies) == 2, copies
    await assert_invariant(server)


# --------------------------------------------------------------------------------------------------
# vLLM's prefix cache keys offloaded images by their tensors, not by their descriptors


async def test_vllms_prefix_cache_hits_a_repeated_offloaded_image(offload: Offload, aiohttp_server: Any) -> None:
    """The same image twice (a fresh extent each time, so different descriptors) hits vLLM's prefix
    cache for its full blocks; another image of the same size, with the same text, hits none of the
    blocks that hold image tokens. With the CPU backend's 128-token blocks the one-image prompt (132
    tokens) has one full block, and it holds the image."""
    server = await sidecar(aiohttp_server, offload.url, offload.model)
    image, other = png_url(*SIZES[0], seed=30), png_url(*SIZES[0], seed=31)
    async with aiohttp.ClientSession() as http:

        async def hits_of(url: str) -> tuple[float, int]:
            before = (await vllm_metrics(offload.url))["vllm:prefix_cache_hits_total"]
            answer = await post(http, url_of(server), chat_body([url], max_tokens=1))
            after = (await vllm_metrics(offload.url))["vllm:prefix_cache_hits_total"]
            return after - before, answer["usage"]["prompt_tokens"]

        cold, prompt_tokens = await hits_of(image)
        repeat, _ = await hits_of(image)
        fresh, _ = await hits_of(other)
    full_blocks = prompt_tokens // 128 * 128
    assert full_blocks > 0, prompt_tokens
    assert cold == 0, cold
    assert repeat == full_blocks, (repeat, prompt_tokens)
    assert fresh == 0, fresh
    await assert_invariant(server)


# --------------------------------------------------------------------------------------------------
# The plugin against vLLM's real processor, and the command (no server)


def test_plugin_items_and_parser_against_vllms_processor(offload: Offload) -> None:
    # In vLLM's interpreter: pytest's has no vLLM. The checkpoint is the one vllm-engine serves.
    result = subprocess.run(
        [vllm_python(), "-m", "tests.vllm_offload_check", str(offload.model)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "all checks passed", result.stdout
    assert "ok: no HF processor call for offloaded images" in lines
    assert "ok: pixel_values identical" in lines


def test_vllm_engine_exits_2_without_vllm() -> None:
    # pytest's interpreter has no vLLM.
    result = subprocess.run(
        [sys.executable, "-m", "mm_sidecar.cli", "vllm-engine", "--model", "m", "--port", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result
    assert "vLLM is not importable" in result.stderr and ".venv-vllm/bin/mm-sidecar" in result.stderr


def test_vllm_engine_command_line_and_refusals() -> None:
    command = cli.build_command(
        model="/m", port=9, tp=2, vllm_args=["--dtype=float32"], environ={}, cpu_build=True, python="py"
    )
    argv = list(command.argv)
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    for flag in ("--no-mm-device-do-normalize", "--middleware", "--tensor-parallel-size"):
        assert flag in argv
    assert argv[argv.index("--mm-processor-cache-gb") + 1] == "0" and argv[-1] == "--dtype=float32"
    assert command.env["MM_SIDECAR_VLLM_OFFLOAD"] == "1" and command.env["VLLM_TARGET_DEVICE"] == "cpu"
    if cli.numa_nodes() < 2:
        assert command.env["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    # A GPU build keeps vLLM's own device, and an explicit binding is never overridden.
    gpu = cli.build_command(model="/m", port=9, tp=2, environ={"VLLM_CPU_OMP_THREADS_BIND": "x"}, python="py")
    assert "VLLM_TARGET_DEVICE" not in gpu.env and gpu.env["VLLM_CPU_OMP_THREADS_BIND"] == "x"
    for token in ("--mm-device-do-normalize", "--enable_mm_embeds", "--mm-processor-cache-gb=4", "-tp", "--port=1"):
        with pytest.raises(cli.EngineCommandError, match="refused"):
            cli.build_command(model="/m", port=9, vllm_args=[token], environ={})
    with pytest.raises(cli.EngineCommandError, match="VLLM_PLUGINS"):
        cli.build_command(model="/m", port=9, environ={"VLLM_PLUGINS": "other"})
    assert cli.omp_bind([0, 1, 2, 3, 4], 2) == "0,1,2|3,4"
    assert cli.omp_bind([0], 2) == "0|0"
    check_vllm_version("0.32.0")
    with pytest.raises(UnsupportedVLLM):
        check_vllm_version("0.33.0")


def test_the_plugin_is_inert_without_its_env() -> None:
    # vLLM calls register() in every process of every vLLM that has the project installed beside it.
    code = "import sys; from engine.vllm_offload import register; register(); assert 'vllm' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "MM_SIDECAR_VLLM_OFFLOAD"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# The sidecar's side, against a fake engine that answers streams as vLLM does (no vLLM needed)


def _chunk(**fields: Any) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
    return b"data: " + json.dumps({**base, **fields}).encode() + b"\n\n"


class StreamingFakeEngine:
    """A stream's headers (the ack) go out at once; its body waits for `go`, as vLLM's generation would."""

    def __init__(self) -> None:
        from .test_offload import FakeEngine

        self.engine = FakeEngine()
        self.engine.behaviour = self.answer
        self.headers_sent = asyncio.Event()
        self.go = asyncio.Event()

    async def answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
        if not body.get("stream"):
            return None  # the fake's whole answer
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        self.headers_sent.set()
        await self.go.wait()
        message = {"role": "assistant", "content": "ok"}
        await resp.write(_chunk(choices=[{"index": 0, "delta": message, "finish_reason": None}]))
        await resp.write(_chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        usage = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
        await resp.write(_chunk(choices=[], usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def fake_sidecar(aiohttp_server: Any, aiohttp_client: Any, **upstream: Any) -> tuple[Any, StreamingFakeEngine]:
    fake = StreamingFakeEngine()
    engine_server = await aiohttp_server(fake.engine.app())
    raw: dict[str, Any] = {
        "upstream": {"mode": "offload", "ack_timeout_s": 10, **upstream},
        "preprocess": {"processor": "qwen2-vl", "workers": 1},
        "gate": {"max_bytes": "64MiB"},
        "shm": {"name": f"vllmoff-fake-{id(fake):x}"},
    }
    client = await aiohttp_client(create_app(make_config(str(engine_server.make_url("")).rstrip("/"), **raw)))
    async with asyncio.timeout(10):
        while not client.app[STATE].engine_verified:
            await asyncio.sleep(0.02)
    return client, fake


async def test_offload_to_vllm_sends_whole_requests_as_streams_and_acks_at_the_first_byte(
    aiohttp_server: Any, aiohttp_client: Any
) -> None:
    from sidecar.app_keys import POOL

    client, fake = await fake_sidecar(aiohttp_server, aiohttp_client, engine="vllm")
    image = png_url(56, 56, seed=8)
    task = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body([image])))
    await asyncio.wait_for(fake.headers_sent.wait(), 30)
    # vLLM's headers are not the ack (it has copied the tensors but not scheduled the request yet):
    # slot and extent stay held until its first streamed byte.
    await asyncio.sleep(0.3)
    assert client.app[POOL].stats().leases == 1 and client.app[PIPELINE].stats()[0].extents == 1
    fake.go.set()
    resp = await task
    answer = await resp.json()
    assert resp.status == 200 and resp.content_type == "application/json", answer
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == "ok"
    assert answer["usage"]["prompt_tokens"] == 7
    sent = fake.engine.bodies[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}

    # A translated route: the assembled chat answer comes back as an Anthropic message.
    b64 = image.split(",", 1)[1]
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [block]}]}
    resp = await client.post("/v1/messages", json=body)
    message = await resp.json()
    assert resp.status == 200, message
    assert message["type"] == "message" and message["content"] == [{"type": "text", "text": "ok"}]
    assert message["stop_reason"] == "end_turn" and message["usage"]["input_tokens"] == 7
    assert fake.engine.bodies[1]["stream"] is True
    await assert_invariant(client)


@pytest.mark.parametrize("upstream", [{"engine": "generic"}, {"engine": "vllm", "stream_upgrade": False}])
async def test_offload_keeps_whole_requests_whole_unless_vllm_with_stream_upgrade(
    aiohttp_server: Any, aiohttp_client: Any, upstream: dict[str, Any]
) -> None:
    client, fake = await fake_sidecar(aiohttp_server, aiohttp_client, **upstream)
    resp = await client.post("/v1/chat/completions", json=chat_body([png_url(56, 56, seed=9)]))
    assert resp.status == 200, await resp.text()
    assert not fake.engine.bodies[0].get("stream")
    await assert_invariant(client)
