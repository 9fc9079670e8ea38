"""A non-streaming answer through the sidecar equals vLLM's own, field for field (issue 12).

Each case sends one non-streaming request twice: straight to real vLLM 0.32 (the `vllm_server` fixture,
the tiny Qwen2-VL) and through the sidecar in passthrough, `upstream.engine: vllm`, `stream_upgrade` on.
The two answers must be the same bytes once ids and creation times are blanked (the only documented
differences). `RecordingHop` (tests/hop.py), a plain aiohttp proxy between the sidecar and vLLM,
records whether the sidecar sent the request upstream as a stream, so each case also checks the
upgrade decision: upgraded where the stream can express the answer, forwarded as sent where it cannot
(README, "stream_upgrade").

Greedy (`temperature: 0`) unless a case seeds its sampling; one 64x48 image; a few tokens per answer.
Completions prompts are text, which the sidecar never gates nor upgrades: those cases check that the
passthrough is byte-faithful for the options the multimodal routes refuse to upgrade.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bench.services import Service
from sidecar.app import create_app

from .conftest import assert_invariant, data_url, image_bytes, make_config, normalised
from .hop import RecordingHop

MODEL = "tiny"
GREEDY: dict[str, Any] = {"temperature": 0}  # a case's own temperature (with a seed) overrides it
CHAT, COMPLETIONS, RESPONSES, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"


def chat(**options: Any) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "Describe"}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **GREEDY, **options}


def messages(**options: Any) -> dict[str, Any]:
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image_bytes()).decode()}
    content = [{"type": "image", "source": source}, {"type": "text", "text": "Describe"}]
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": content}], **GREEDY, **options}


def responses(**options: Any) -> dict[str, Any]:
    content = [{"type": "input_image", "image_url": data_url()}, {"type": "input_text", "text": "Describe"}]
    return {
        "model": MODEL,
        "input": [{"role": "user", "content": content}],
        "max_output_tokens": 3,
        **GREEDY,
        **options,
    }


def completions(**options: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Describe the", "max_tokens": 3, **GREEDY, **options}


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict[str, Any]
    upgraded: bool  # whether the sidecar must send it upstream as a stream
    status: int = 200


CASES = [
    Case("chat", CHAT, chat(), True),
    Case("chat-return_token_ids", CHAT, chat(return_token_ids=True), True),
    Case("chat-logprobs", CHAT, chat(logprobs=True, top_logprobs=2), True),
    Case("chat-n2-seed", CHAT, chat(n=2, temperature=1, seed=7, return_token_ids=True, logprobs=True), True),
    Case("chat-seed", CHAT, chat(temperature=0.9, seed=11, max_tokens=4), True),
    Case("chat-stop", CHAT, chat(stop=["is"], max_tokens=6), True),
    Case("chat-max_tokens-1", CHAT, chat(max_tokens=1, return_prompt_text=True), True),
    Case("chat-prompt_logprobs", CHAT, chat(prompt_logprobs=1), False),
    Case("chat-echo", CHAT, chat(echo=True), False),
    Case("chat-stream_options", CHAT, chat(stream_options={"include_usage": True}), False, 400),
    Case("messages", MESSAGES, messages(), True),
    Case("messages-stop_sequences", MESSAGES, messages(stop_sequences=["is"], max_tokens=8), True),
    Case("messages-max_tokens-1", MESSAGES, messages(max_tokens=1), True),
    Case("responses", RESPONSES, responses(), True),
    Case("responses-top_p", RESPONSES, responses(max_output_tokens=5, top_p=0.5), True),
    Case("responses-logprobs", RESPONSES, responses(include=["message.output_text.logprobs"], top_logprobs=2), False),
    Case("completions-return_token_ids", COMPLETIONS, completions(return_token_ids=True, logprobs=2), False),
    Case("completions-echo", COMPLETIONS, completions(echo=True, logprobs=1), False),
    Case("completions-prompt_logprobs", COMPLETIONS, completions(prompt_logprobs=1), False),
    Case("completions-n2-seed", COMPLETIONS, completions(n=2, temperature=1, seed=3), False),
]


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, json=body) as resp:
        return resp.status, orjson.loads(await resp.read())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_non_streaming_answer_equals_vllms(vllm_server: Service, aiohttp_server: Any, case: Case) -> None:
    hop = RecordingHop(vllm_server.url)
    upstream: TestServer = await aiohttp_server(hop.app())
    config = make_config(
        str(upstream.make_url("")).rstrip("/"),
        upstream={"engine": "vllm", "stream_upgrade": True, "ack_timeout_s": 120},
    )
    sidecar: TestServer = await aiohttp_server(create_app(config))
    async with aiohttp.ClientSession() as http:
        status, direct = await post(http, vllm_server.url + case.path, case.body)
        through_status, through = await post(http, str(sidecar.make_url(case.path)), case.body)
    assert status == case.status, direct
    assert through_status == status, through
    assert orjson.dumps(normalised(through)).decode() == orjson.dumps(normalised(direct)).decode()
    assert hop.seen == [(case.path, case.upgraded)]
    await assert_invariant(sidecar)
