"""The official `openai` and `anthropic` SDKs pointed at the sidecar, with a real echo upstream behind it."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import create_app
from sidecar.app_keys import METRICS, POOL
from sidecar.echo import EchoEngine

from .conftest import assert_invariant, data_url, image_bytes, make_config

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def sidecar(aiohttp_server: Any) -> Callable[..., Awaitable[tuple[TestServer, EchoEngine]]]:
    async def build(engine: EchoEngine | None = None, **sections: dict[str, Any]) -> tuple[TestServer, EchoEngine]:
        engine = engine or EchoEngine(tokens=3)
        upstream = await aiohttp_server(engine.app())
        server = await aiohttp_server(create_app(make_config(str(upstream.make_url("")).rstrip("/"), **sections)))
        return server, engine

    return build


def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


def image_content() -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "what is this?"}]


async def assert_idle(server: TestServer) -> None:
    stats = server.app[POOL].stats()
    assert (stats.leases, stats.reserved_bytes, stats.queued) == (0, 0, 0)
    await assert_invariant(server)


async def test_openai_chat_with_image_stream_and_not(sidecar: Any) -> None:
    server, engine = await sidecar()
    client = openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key="sk-test", max_retries=0)
    async with client:
        done = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": image_content()}], max_tokens=3
        )
        assert done.choices[0].message.content == "tok0 tok1 tok2 "
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 3

        stream = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": image_content()}], stream=True
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == "tok0 tok1 tok2 "
    assert [b["stream"] for b in engine.stats.bodies] == [True, True]  # the first one was upgraded
    await assert_idle(server)


async def test_openai_responses_with_image_stream_and_not(sidecar: Any) -> None:
    server, _ = await sidecar()
    client = openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key="sk-test", max_retries=0)
    content = [{"type": "input_text", "text": "what?"}, {"type": "input_image", "image_url": data_url()}]
    async with client:
        resp = await client.responses.create(model="echo", input=[{"role": "user", "content": content}])  # type: ignore[list-item]
        assert resp.status == "completed" and resp.output_text == "tok0 tok1 tok2 "

        events = await client.responses.create(
            model="echo",
            input=[{"role": "user", "content": content}],  # type: ignore[list-item]
            stream=True,
        )
        deltas = [e.delta async for e in events if e.type == "response.output_text.delta"]
        assert "".join(deltas) == "tok0 tok1 tok2 "
    await assert_idle(server)


async def test_anthropic_messages_with_image_stream_and_not(sidecar: Any) -> None:
    server, engine = await sidecar()
    client = anthropic.AsyncAnthropic(base_url=base_url(server), api_key="sk-test", max_retries=0)
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image_bytes()).decode()},
    }
    messages: Any = [{"role": "user", "content": [image, {"type": "text", "text": "what is this?"}]}]
    async with client:
        msg = await client.messages.create(model="echo", max_tokens=16, messages=messages)
        assert msg.content[0].type == "text" and msg.content[0].text == "tok0 tok1 tok2 "
        assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3

        async with client.messages.stream(model="echo", max_tokens=16, messages=messages) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "tok0 tok1 tok2 " and final.stop_reason == "max_tokens"
    assert [b["stream"] for b in engine.stats.bodies] == [True, True]
    await assert_idle(server)


class _HoldFirst:
    """Parks the first request at the engine until released; later ones go straight through."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    async def __call__(self, request: web.Request, body: dict[str, Any]) -> None:
        if not self.arrived.is_set():
            self.arrived.set()
            await self.release.wait()


def _rejections(server: TestServer, reason: str) -> float:
    return server.app[METRICS].registry.get_sample_value("mm_sidecar_rejections_total", {"reason": reason}) or 0.0


async def _release_after_next_rejection(server: TestServer, hold: _HoldFirst, reason: str) -> None:
    before = _rejections(server, reason)
    async with asyncio.timeout(10):
        while _rejections(server, reason) <= before:
            await asyncio.sleep(0.005)
    hold.release.set()


async def test_openai_sdk_retries_a_429_after_retry_after(sidecar: Any) -> None:
    hold = _HoldFirst()
    server, engine = await sidecar(
        EchoEngine(tokens=2, before_first_chunk=hold), gate={"max_concurrent": 1, "max_queue": 0, "retry_after_s": 0.2}
    )
    url = base_url(server) + "/v1"
    blocker = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0)
    retrier = openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=3)
    async with blocker, retrier:
        first = asyncio.create_task(
            blocker.chat.completions.create(model="echo", messages=[{"role": "user", "content": image_content()}])
        )
        await hold.arrived.wait()
        releaser = asyncio.create_task(_release_after_next_rejection(server, hold, "queue_full"))
        raw = await retrier.chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": image_content()}]
        )
        await releaser
        assert raw.retries_taken >= 1  # the 429 was seen and retried, not failed
        assert raw.parse().choices[0].message.content == "tok0 tok1 "
        await first
    assert _rejections(server, "queue_full") == raw.retries_taken
    assert engine.stats.requests == 2
    await assert_idle(server)


async def test_anthropic_sdk_sees_529_and_retries(sidecar: Any) -> None:
    hold = _HoldFirst()
    server, _ = await sidecar(
        EchoEngine(tokens=2, before_first_chunk=hold),
        gate={"max_concurrent": 1, "max_queue": 0, "retry_after_s": 0.2, "anthropic_overload_status": 529},
    )
    b64 = base64.b64encode(image_bytes()).decode()
    messages: Any = [
        {
            "role": "user",
            "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}],
        }
    ]
    no_retry = anthropic.AsyncAnthropic(base_url=base_url(server), api_key="k", max_retries=0)
    retrier = anthropic.AsyncAnthropic(base_url=base_url(server), api_key="k", max_retries=3)
    async with no_retry, retrier:
        first = asyncio.create_task(no_retry.messages.create(model="echo", max_tokens=8, messages=messages))
        await hold.arrived.wait()
        with pytest.raises(anthropic.APIStatusError) as info:
            await no_retry.messages.create(model="echo", max_tokens=8, messages=messages)
        assert info.value.status_code == 529
        assert isinstance(info.value, anthropic.InternalServerError)
        releaser = asyncio.create_task(_release_after_next_rejection(server, hold, "queue_full"))
        raw = await retrier.messages.with_raw_response.create(model="echo", max_tokens=8, messages=messages)
        await releaser
        assert raw.retries_taken >= 1
        assert (await raw.parse()).content[0].text == "tok0 tok1 "  # type: ignore[union-attr]
        await first
    await assert_idle(server)


async def test_openai_sdk_gets_a_clear_400_for_a_bad_image(sidecar: Any) -> None:
    server, engine = await sidecar()
    client = openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key="k", max_retries=0)
    bad = [
        {"type": "text", "text": "x"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}},
    ]
    async with client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": bad}])  # type: ignore[misc]
    body: Any = info.value.body
    assert body["param"] == "messages[0].content[1]"
    assert "unsupported image format" in body["message"]
    assert engine.stats.requests == 0
