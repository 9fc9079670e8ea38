"""The real-engine tier: the sidecar in passthrough in front of real vLLM (`make vllm-env`).

One vLLM serves the whole run (`vllm_server` in conftest.py: the tiny Qwen2-VL, processor cache off);
the crash test starts one of its own, because it kills it. Every claim about what vLLM did is observed
from outside the sidecar: vLLM's own answers and /metrics, or `RecordingHop`, a plain aiohttp proxy
between the sidecar and vLLM that timestamps each request's body sent and its first response byte.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from bench.images import photo_jpeg
from bench.services import VLLM_MODEL_NAME, Service, vllm
from engine.tiny import TINY_MODEL_NAME, ensure_tiny_model
from sidecar.app import create_app
from sidecar.app_keys import POOL

from .conftest import assert_invariant, make_config, vllm_metrics
from .hop import RecordingHop

MODEL = VLLM_MODEL_NAME
# Greedy: vLLM samples at temperature 1 unless told otherwise, and these tests compare answers.
GREEDY: dict[str, Any] = {"temperature": 0}


def jpeg_b64(seed: int = 0, size: tuple[int, int] = (320, 240)) -> str:
    return base64.b64encode(photo_jpeg(*size, seed=seed)).decode("ascii")


def chat_content(seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[dict[str, Any]]:
    url = "data:image/jpeg;base64," + jpeg_b64(seed, size)
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]


def chat_request(seed: int = 0, *, max_tokens: int = 2, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": chat_content(seed)}], "max_tokens": max_tokens}
    return {**body, **GREEDY, **extra}


async def sidecar_server(aiohttp_server: Any, upstream: str, **sections: dict[str, Any]) -> TestServer:
    base: dict[str, dict[str, Any]] = {"upstream": {"ack_timeout_s": 120, "connect_timeout_s": 5}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    server: TestServer = await aiohttp_server(create_app(make_config(upstream, **base)))
    return server


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def wait_engine_idle(url: str, timeout_s: float = 20.0) -> float:
    """Seconds until vLLM reports no running and no waiting request; fails after `timeout_s`."""
    started = time.monotonic()
    while True:
        metrics = await vllm_metrics(url)
        busy = metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0)
        if busy == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"vLLM still busy after {timeout_s} s: {metrics}"
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------------------------------
# The four API families, through the official SDKs


async def test_openai_and_anthropic_sdks_with_images_stream_and_not(vllm_server: Service, aiohttp_server: Any) -> None:
    server = await sidecar_server(aiohttp_server, vllm_server.url)
    content = chat_content()
    oai = openai.AsyncOpenAI(base_url=url_of(server) + "/v1", api_key="sk-test", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=vllm_server.url + "/v1", api_key="sk-test", max_retries=0)
    async with oai, direct:
        messages: Any = [{"role": "user", "content": content}]
        done = await oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
        reference = await direct.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
        assert done.choices[0].message.content == reference.choices[0].message.content
        assert done.usage is not None and reference.usage is not None
        assert done.usage.prompt_tokens == reference.usage.prompt_tokens > 100  # the image's tokens are in it
        assert done.usage.completion_tokens == 3

        stream = await oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=3, temperature=0, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == reference.choices[0].message.content

        prompt = "Describe the picture"
        text = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
        text_ref = await direct.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
        assert text.choices[0].text == text_ref.choices[0].text
        text_stream = await oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, stream=True)
        assert "".join([c.choices[0].text async for c in text_stream if c.choices]) == text_ref.choices[0].text

        parts: Any = [
            {"type": "input_image", "image_url": content[0]["image_url"]["url"]},
            {"type": "input_text", "text": "Describe the image."},
        ]
        resp = await oai.responses.create(
            model=MODEL, input=[{"role": "user", "content": parts}], max_output_tokens=3, temperature=0
        )
        resp_ref = await direct.responses.create(
            model=MODEL, input=[{"role": "user", "content": parts}], max_output_tokens=3, temperature=0
        )
        assert resp.output_text == resp_ref.output_text and resp.usage is not None and resp_ref.usage is not None
        assert resp.usage.input_tokens == resp_ref.usage.input_tokens
        events = await oai.responses.create(
            model=MODEL, input=[{"role": "user", "content": parts}], max_output_tokens=3, temperature=0, stream=True
        )
        deltas = [e.delta async for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == resp_ref.output_text

    ant = anthropic.AsyncAnthropic(base_url=url_of(server), api_key="sk-test", max_retries=0)
    ant_direct = anthropic.AsyncAnthropic(base_url=vllm_server.url, api_key="sk-test", max_retries=0)
    block: Any = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg_b64()}},
        {"type": "text", "text": "Describe the image."},
    ]
    async with ant, ant_direct:
        msg = await ant.messages.create(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": block}], extra_body=GREEDY
        )
        msg_ref = await ant_direct.messages.create(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": block}], extra_body=GREEDY
        )
        assert [b.model_dump() for b in msg.content] == [b.model_dump() for b in msg_ref.content]
        assert msg.usage.input_tokens == msg_ref.usage.input_tokens and msg.stop_reason == "max_tokens"
        async with ant.messages.stream(
            model=MODEL, max_tokens=3, messages=[{"role": "user", "content": block}], extra_body=GREEDY
        ) as ant_stream:
            streamed = "".join([t async for t in ant_stream.text_stream])
        assert streamed == "".join(b.text for b in msg_ref.content if b.type == "text")
    await assert_invariant(server)


async def test_models_health_and_tokenize_pass_through(vllm_server: Service, aiohttp_server: Any) -> None:
    server = await sidecar_server(aiohttp_server, vllm_server.url)
    tokenize = {"model": MODEL, "messages": [{"role": "user", "content": chat_content()}]}
    async with aiohttp.ClientSession() as http:
        answers: dict[str, list[Any]] = {}
        for base in (url_of(server), vllm_server.url):
            async with http.get(base + "/v1/models") as models, http.get(base + "/health") as health:
                assert models.status == 200 and health.status == 200
                listing = await models.json()
            async with http.post(base + "/tokenize", json=tokenize) as tok:
                assert tok.status == 200, await tok.text()
                tokens = await tok.json()
            for card in listing["data"]:
                # vLLM stamps each listing with the time of the call and a fresh permission id.
                card.pop("created")
                for permission in card["permission"]:
                    permission.pop("created"), permission.pop("id")
            answers.setdefault("models", []).append(listing)
            answers.setdefault("tokenize", []).append(tokens)
        assert answers["models"][0] == answers["models"][1]
        assert [c["id"] for c in answers["models"][0]["data"]] == [MODEL]
        assert answers["tokenize"][0] == answers["tokenize"][1]
        assert answers["tokenize"][0]["count"] > 100  # the image placeholder tokens were counted
    await assert_invariant(server)


# --------------------------------------------------------------------------------------------------
# The gate, seen from vLLM's side


@pytest.mark.parametrize(("gate", "expected"), [(1, 1), (4, None)])
async def test_the_gate_bounds_what_vllm_holds(
    vllm_server: Service, aiohttp_server: Any, gate: int, expected: int | None
) -> None:
    """16 concurrent image requests: with gate 1, vLLM never holds two of them between receiving one and
    its first answer byte; with gate 4 the same hop sees more than one (the observation can fail)."""
    hop = RecordingHop(vllm_server.url)
    hop_server = await aiohttp_server(hop.app())
    server = await sidecar_server(
        aiohttp_server, url_of(hop_server), gate={"max_concurrent": gate, "max_queue": 64, "queue_timeout_s": 120}
    )
    async with aiohttp.ClientSession() as http:

        async def one(seed: int) -> int:
            body = chat_request(seed, max_tokens=1, stream=seed % 2 == 1)  # half streaming, half upgraded
            async with http.post(url_of(server) + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(seed) for seed in range(16)))
    assert statuses == [200] * 16
    assert len(hop.exchanges) == 16 and all(e.first_byte is not None for e in hop.exchanges)
    if expected is not None:
        assert hop.max_inside() == expected
    else:
        assert 1 < hop.max_inside() <= gate
    await assert_invariant(server)


# --------------------------------------------------------------------------------------------------
# Client disconnects stop vLLM's generation


# Tokens: ~15 s of decoding for the tiny model here. Two such requests cut short generate fewer than
# LONG tokens in all; one left running would generate LONG by itself.
LONG = 3500


async def test_disconnects_stop_vllms_generation_and_leave_no_lease(vllm_server: Service, aiohttp_server: Any) -> None:
    hop = RecordingHop(vllm_server.url)
    hop_server = await aiohttp_server(hop.app())
    server = await sidecar_server(
        aiohttp_server, url_of(hop_server), gate={"max_concurrent": 1, "max_queue": 8, "queue_timeout_s": 60}
    )
    chat = url_of(server) + "/v1/chat/completions"
    await wait_engine_idle(vllm_server.url)
    before = await vllm_metrics(vllm_server.url)
    async with aiohttp.ClientSession() as http:
        # Mid-stream: read a few chunks, then hang up.
        async with http.post(chat, json=chat_request(1, max_tokens=LONG, stream=True)) as resp:
            assert resp.status == 200
            for _ in range(5):
                await resp.content.readline()
            assert (await vllm_metrics(vllm_server.url))["vllm:num_requests_running"] == 1
        assert await wait_engine_idle(vllm_server.url, 30) < 30  # the decisive check: tokens, below

        # In flight, not streaming (upgraded): vLLM is generating, the client gives up.
        task = asyncio.create_task(_post_json(http, chat, chat_request(2, max_tokens=LONG)))
        await _until(lambda: len(hop.exchanges) == 2 and hop.exchanges[-1].first_byte is not None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_engine_idle(vllm_server.url, 30) < 30  # the decisive check: tokens, below

        # Queued: a request holds the gate's one slot (the hop delays it on its way to vLLM), another
        # waits behind it and its client gives up.
        hop.open.clear()
        holder = asyncio.create_task(_post_json(http, chat, chat_request(3, max_tokens=1)))
        queued = asyncio.create_task(_post_json(http, chat, chat_request(4, max_tokens=1)))
        await _until(lambda: server.app[POOL].stats().queued == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await _until(lambda: server.app[POOL].stats().queued == 0)
        hop.open.set()
        assert await holder == 200
    after = await vllm_metrics(vllm_server.url)
    # The queued request never reached vLLM; the two long ones were cut short (fewer than LONG tokens).
    assert [e.path for e in hop.exchanges] == ["/v1/chat/completions"] * 3
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert generated < LONG, generated
    finished = {
        reason: after[f"vllm:request_success_total:{reason}"] - before[f"vllm:request_success_total:{reason}"]
        for reason in ("length", "stop", "error")
    }
    assert finished == {"length": 1, "stop": 0, "error": 0}  # only the holder ran to its end
    await assert_invariant(server)


async def _post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with http.post(url, json=body) as resp:
        await resp.read()
        return resp.status


async def _until(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# vLLM crashes


@pytest.fixture
def doomed_vllm(tmp_path: Path) -> Iterator[Service]:
    """A vLLM of this test's own (a smaller KV cache), for killing."""
    model = ensure_tiny_model(tmp_path / TINY_MODEL_NAME)
    with vllm(model, tmp_path, kv_cache_gb=1) as service:
        yield service


async def test_a_vllm_crash_gives_clear_502s_and_a_log_line(
    doomed_vllm: Service, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = await sidecar_server(aiohttp_server, doomed_vllm.url)
    chat = url_of(server) + "/v1/chat/completions"
    caplog.set_level(logging.WARNING, logger="mm_sidecar.upstream")
    async with aiohttp.ClientSession() as http:
        async with http.post(chat, json=chat_request(0, max_tokens=1)) as resp:
            assert resp.status == 200  # it works before the crash
        waiting = asyncio.create_task(_answer(http, chat, chat_request(1, max_tokens=LONG)))  # upgraded, in flight
        streaming = await http.post(chat, json=chat_request(2, max_tokens=LONG, stream=True))
        assert streaming.status == 200
        await streaming.content.readline()
        os.killpg(doomed_vllm.pid, signal.SIGKILL)  # API server, EngineCore and worker at once

        status, error = await waiting
        assert status == 502 and error["error"]["code"] == "upstream_bad_response", error
        tail = (await streaming.read()).decode()
        assert "upstream_bad_response" in tail  # in-band: the 200 was already sent
        # A pooled keep-alive connection to the dead engine is reset; after that nothing listens.
        status, error = await _answer(http, chat, chat_request(3, max_tokens=1))
        assert status == 502 and error["error"]["code"] == "upstream_unavailable", error
        assert error["error"]["message"].startswith(
            ("the engine closed the connection", "cannot connect to the engine")
        )
        status, error = await _answer(http, chat, chat_request(4, max_tokens=1))
        assert status == 502 and error["error"]["code"] == "upstream_unavailable", error
        assert "cannot connect to the engine" in error["error"]["message"]
    lines = [r.getMessage() for r in caplog.records if r.name == "mm_sidecar.upstream"]
    assert any("broke off its answer" in line for line in lines), lines
    assert any("broke off the stream" in line for line in lines), lines
    assert any("cannot connect to the engine" in line for line in lines), lines
    await assert_invariant(server)


async def _answer(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)
