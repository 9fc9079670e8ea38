"""The reference engine's HTTP answers, against a real engine process: streamed tokens leave as they are
generated, non-streamed answers keep their shape, and `max_tokens` is checked.

One engine per module, started by the launcher itself (`engine.launch.run_engine`, one rank: the
streaming path is rank 0's, whatever the number of ranks; tests/test_e2e.py streams through two),
on the CPU with one thread, as tests/test_e2e.py runs it. Timings are compared within one request
(the first chunk against the last), never against a fixed number of seconds: this machine is noisy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.tiny import ensure_tiny_model

from .conftest import engine_process

START_TIMEOUT_S = 120
# Enough tokens that generating them takes many times what the prompt does (about 2 ms each here).
LONG = 200
HELLO: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def engine(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    with engine_process(["--model", str(tiny_dir), "--tp", "1"], log, START_TIMEOUT_S) as url:
        yield url


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def chat(max_tokens: Any = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "messages": HELLO, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[float, list[Any]]:
    """POST a streamed request; (when it was sent, [(arrival, read number, event payload)]).

    An event arrives with the read that completes it; payloads are parsed JSON, or "[DONE]".
    """
    events: list[tuple[float, int, Any]] = []
    buffer = b""
    sent = time.perf_counter()
    async with http.post(url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        reads = 0
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            reads += 1
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                assert event.startswith(b"data: "), event
                payload = event.removeprefix(b"data: ")
                events.append((now, reads, "[DONE]" if payload == b"[DONE]" else json.loads(payload)))
    assert buffer == b""
    return sent, events


def content_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for _, _, e in events if e != "[DONE]" and e["choices"]
    )


async def test_the_first_chunk_arrives_long_before_the_last(http: aiohttp.ClientSession, engine: str) -> None:
    sent, events = await stream(http, engine, chat(LONG))
    content = [(t, read) for t, read, e in events if e != "[DONE]" and e["choices"][0]["delta"].get("content")]
    done_at = events[-1][0]
    assert events[-1][2] == "[DONE]"
    first_at = content[0][0]
    total = done_at - sent
    # Before the change the whole answer left in one write after the last token: first == last.
    assert first_at - sent < 0.25 * total, (first_at - sent, total)
    assert done_at - first_at > 0.5 * total, (first_at - sent, total)
    # ...and chunk by chunk: the content came in many separate reads, spread over the generation.
    reads = {read for _, read in content}
    assert len(reads) >= 10, (len(reads), len(content))
    print(f"\nfirst content chunk {first_at - sent:.3f}s, [DONE] {total:.3f}s, {len(reads)} reads of {len(content)}")


async def test_the_role_chunk_comes_with_the_first_token_and_usage_and_done_close_the_stream(
    http: aiohttp.ClientSession, engine: str
) -> None:
    _, events = await stream(http, engine, chat(8, stream_options={"include_usage": True}))
    payloads = [e for _, _, e in events]
    first, *middle, finish, usage, done = payloads
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
    }
    assert all(set(e["choices"][0]["delta"]) == {"content"} for e in middle) and middle
    assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 8
    assert done == "[DONE]"
    assert len({(e["id"], e["created"], e["model"]) for e in payloads[:-1]}) == 1


async def test_health_is_answered_while_a_stream_is_generating(http: aiohttp.ClientSession, engine: str) -> None:
    async def health() -> float:
        async with http.get(engine + "/health") as resp:
            assert resp.status == 200
            return time.perf_counter()

    async with http.post(engine + "/v1/chat/completions", json=chat(LONG, stream=True)) as resp:
        await resp.content.readany()  # generation has started
        probe = asyncio.create_task(health())
        await resp.read()
        finished = time.perf_counter()
    assert await probe < finished  # the event loop served /health before the generation ended


async def test_a_client_that_leaves_mid_stream_does_not_stop_the_engine(
    http: aiohttp.ClientSession, engine: str
) -> None:
    async with http.post(engine + "/v1/chat/completions", json=chat(LONG, stream=True)) as resp:
        await resp.content.readany()
        resp.close()  # the connection goes; generation runs on to its end on the model thread
    _, events = await stream(http, engine, chat(4))
    assert events[-1][2] == "[DONE]" and content_of(events)


async def test_streamed_and_plain_answers_agree_and_keep_their_shape(
    http: aiohttp.ClientSession, engine: str, tiny_dir: Path
) -> None:
    from engine.model import VLModel

    async with http.post(engine + "/v1/chat/completions", json=chat(12)) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        raw = await resp.read()
    answer = json.loads(raw)
    # Field for field what the engine answered before streaming changed (keys in this order).
    assert list(answer) == ["id", "created", "model", "object", "choices", "usage"]
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny-qwen2-vl"
    (choice,) = answer["choices"]
    assert list(choice) == ["index", "message", "finish_reason", "logprobs"]
    assert choice["message"].keys() == {"role", "content"} and choice["finish_reason"] == "length"
    assert list(answer["usage"]) == ["prompt_tokens", "completion_tokens", "total_tokens"]
    assert answer["usage"]["completion_tokens"] == 12
    # The same greedy text as the model produces in this process, and as the stream carries.
    model = VLModel.load(tiny_dir, tp=False)
    expected = model.decode(model.generate(model.build_inputs(HELLO, []), max_new_tokens=12))
    assert choice["message"]["content"] == expected
    _, events = await stream(http, engine, chat(12))
    assert content_of(events) == expected


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("max_tokens", 0, "0"),
        ("max_tokens", -1, "-1"),
        ("max_tokens", 1.5, "1.5"),
        ("max_tokens", "16", '"16"'),
        ("max_tokens", True, "true"),
        ("max_tokens", 16.0, "16.0"),
        ("max_tokens", [16], "[16]"),
        ("max_completion_tokens", 0, "0"),
    ],
)
async def test_a_bad_max_tokens_is_a_400_naming_the_field_and_the_value(
    http: aiohttp.ClientSession, engine: str, field: str, value: Any, shown: str
) -> None:
    for streamed in (False, True):
        body = {"model": "tiny", "messages": HELLO, field: value, "stream": streamed}
        async with http.post(engine + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 400 and resp.content_type == "application/json"
            error = await resp.json()
        assert error == {
            "error": {
                "message": f"{field} must be an integer >= 1, got {shown}",
                "type": "invalid_request_error",
                "param": field,
                "code": "invalid_value",
            }
        }


@pytest.mark.parametrize(
    ("limits", "tokens"),
    [({}, 16), ({"max_tokens": None}, 16), ({"max_completion_tokens": 3}, 3), ({"max_tokens": 1}, 1)],
)
async def test_max_tokens_absent_or_null_is_the_default(
    http: aiohttp.ClientSession, engine: str, limits: dict[str, Any], tokens: int
) -> None:
    async with http.post(engine + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO, **limits}) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["usage"]["completion_tokens"] == tokens


async def test_stream_options_that_are_not_an_object_are_a_400(http: aiohttp.ClientSession, engine: str) -> None:
    async with http.post(engine + "/v1/chat/completions", json=chat(2, stream=True, stream_options="yes")) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["error"]["param"] == "stream_options"


async def test_a_body_that_is_not_an_object_is_a_400(http: aiohttp.ClientSession, engine: str) -> None:
    async with http.post(engine + "/v1/chat/completions", json=[1, 2]) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert error["error"]["message"] == "the request body must be a JSON object"
