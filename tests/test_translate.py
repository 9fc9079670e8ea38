"""Tests for sidecar.translate, checked against the official SDKs on both ends.

Requests are captured as the SDKs send them (an SDK client over a mock transport), answers are checked by
the SDKs' own models and stream accumulators. Upstream chat streams are written as vLLM sends them, down to
the SSE bytes, and parsed with the sidecar's own SSEParser.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types import Completion
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from sidecar.assemble import assembler_for
from sidecar.classify import Classification, walk
from sidecar.config import LimitsConfig
from sidecar.errors import Cause, SidecarError
from sidecar.sse import SSEEvent, SSEParser
from sidecar.translate import (
    StreamTranslator,
    TranslationError,
    chat_stream_to_completions,
    chat_stream_to_messages,
    chat_stream_to_responses,
    chat_to_completions,
    chat_to_messages,
    chat_to_responses,
    completions_to_chat,
)
from sidecar.translate import messages_to_chat as translate_messages
from sidecar.translate import responses_to_chat as translate_responses
from sidecar.translate.answers import chat_error_to_messages, chat_error_to_responses
from sidecar.translate.completions import chat_error_to_completions

JSON = dict[str, Any]

PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\nnot-really").decode()
TENSORS: Any = {"type": "image_tensors", "tensors": {"pixel_values": {"segment": "arena0", "offset": 4096}}}
# A real image of each shape, walked where a TENSORS part stands; then rewritten into it, as offload does.
_IMAGES: dict[str, JSON] = {
    "messages": {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
    "responses": {"type": "input_image", "image_url": f"data:image/png;base64,{PNG_B64}"},
}


def _offloaded(kind: Any, body: JSON) -> Classification:
    """The walker's result for `body` as the sidecar holds it when it translates: each TENSORS part
    was an image the walk checked and offload's rewrite replaced, in place."""
    rewritten: list[tuple[JSON, JSON]] = []

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            if value.get("type") == "image_tensors":
                image = copy.deepcopy(_IMAGES[kind])
                rewritten.append((image, value))
                return image
            for key, inner in value.items():
                value[key] = swap(inner)
        elif isinstance(value, list):
            value[:] = [swap(inner) for inner in value]
        return value

    swap(body)
    found = walk(kind, body, LimitsConfig(allowed_part_types=("image_embeds",)))
    for node, tensors in rewritten:
        node.clear()
        node.update(tensors)
    return found


def messages_to_chat(body: JSON) -> JSON:
    return translate_messages(body, _offloaded("messages", body).chat_part)


def responses_to_chat(body: JSON) -> JSON:
    return translate_responses(body, _offloaded("responses", body).chat_part)


# ------------------------------------------------------------------------------------------------
# Upstream chat streams, as vLLM writes them

_HEAD = b'data: {"id":"chatcmpl-abc123","object":"chat.completion.chunk","created":1718000000,"model":"qwen2-vl",'

TEXT_STREAM = (
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}'
    b"\n\n"
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"content":"A red"},"logprobs":null,"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"content":" square."},"logprobs":null,"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop","stop_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[],"usage":{"prompt_tokens":95,"total_tokens":99,"completion_tokens":4}}\n\n'
    b"data: [DONE]\n\n"
)

TOOL_STREAM = (
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}'
    b"\n\n"
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"content":"Checking."},"logprobs":null,"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"tool_calls":[{"id":"chatcmpl-tool-1","type":"function","index":0,'
    b'"function":{"name":"get_weather"}}]},"logprobs":null,"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": "}}]},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"Paris\\"}"}}]},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"tool_calls":[{"id":"chatcmpl-tool-2","type":"function","index":1,'
    b'"function":{"name":"get_time","arguments":"{\\"tz\\": \\"CET\\"}"}}]},"logprobs":null,"finish_reason":null}]}'
    b"\n\n"
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"tool_calls","stop_reason":null}]}'
    b"\n\n" + _HEAD + b'"choices":[],"usage":{"prompt_tokens":120,"total_tokens":150,"completion_tokens":30,'
    b'"prompt_tokens_details":{"cached_tokens":64}}}\n\n'
    b"data: [DONE]\n\n"
)

LENGTH_STREAM = (
    _HEAD
    + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Once upon"},"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"content":" a"},"finish_reason":"length","stop_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[],"usage":{"prompt_tokens":10,"total_tokens":12,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)

STOP_STRING_STREAM = (
    _HEAD
    + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"1, 2, 3"},"finish_reason":null}]}\n\n'
    + _HEAD
    + b'"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop","stop_reason":"END"}]}\n\n'
    b"data: [DONE]\n\n"
)

ERROR_STREAM = (
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Half an"},"finish_reason":null}]}\n\n'
    b'data: {"error":{"object":"error","message":"EngineCore died unexpectedly","type":"InternalServerError",'
    b'"param":null,"code":500}}\n\n'
    b"data: [DONE]\n\n"
)


def events(raw: bytes) -> list[SSEEvent]:
    # 7-byte chunks: the translator must not care how the network cut the body.
    parser = SSEParser()
    out = [event for start in range(0, len(raw), 7) for event in parser.feed(raw[start : start + 7])]
    return out + parser.close()


def run(translator: StreamTranslator, raw: bytes) -> list[bytes]:
    frames = [frame for event in events(raw) for frame in translator.feed(event)]
    return frames + translator.finish()


def decode(frames: list[bytes]) -> list[JSON]:
    """The client's view of the frames: each parsed back, its SSE event name equal to its payload type."""
    parsed = SSEParser().feed(b"".join(frames))
    assert len(parsed) == len(frames)
    payloads = [orjson.loads(event.data) for event in parsed]
    assert [event.event for event in parsed] == [payload["type"] for payload in payloads]
    return payloads


def assembled(raw: bytes) -> JSON:
    assembler = assembler_for("chat")
    for event in events(raw):
        assembler.add(event)
    return assembler.result()


ANTHROPIC_EVENT = TypeAdapter(RawMessageStreamEvent)
RESPONSES_EVENT = TypeAdapter(ResponseStreamEvent)


def validate_messages_stream(payloads: list[JSON]) -> None:
    for payload in payloads:
        if payload["type"] not in ("ping", "error"):  # the SDK skips pings and raises on errors
            ANTHROPIC_EVENT.validate_python(payload)


def validate_responses_stream(payloads: list[JSON]) -> None:
    for payload in payloads:
        RESPONSES_EVENT.validate_python(payload)
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))


# ------------------------------------------------------------------------------------------------
# The SDKs, pointed at a fake sidecar + offload engine


class FakeSidecar:
    """Answers SDK requests the way the sidecar does in offload mode, with a canned upstream chat stream.

    It records the chat request each client request translated to; streaming answers go through the
    stream translators, non-streaming ones through the chat assembler and the chat_to_* functions.
    """

    def __init__(self, upstream: bytes) -> None:
        self.upstream = upstream
        self.chat_requests: list[JSON] = []

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = orjson.loads(request.content)
        if request.url.path.endswith("/messages"):
            self.chat_requests.append(messages_to_chat(body))
            if body.get("stream"):
                frames = run(chat_stream_to_messages(body["model"], "req-1"), self.upstream)
                return self._sse(frames)
            return httpx2.Response(200, json=chat_to_messages(assembled(self.upstream)))
        if request.url.path.endswith("/completions"):
            self.chat_requests.append(completions_to_chat(body))
            if body.get("stream"):
                return self._sse(run(chat_stream_to_completions(body["model"], "cmpl-req-1"), self.upstream))
            return httpx2.Response(200, json=chat_to_completions(assembled(self.upstream), body["model"]))
        self.chat_requests.append(responses_to_chat(body))
        if body.get("stream"):
            return self._sse(run(chat_stream_to_responses(body, "resp_req-1"), self.upstream))
        return httpx2.Response(200, json=chat_to_responses(assembled(self.upstream), body))

    @staticmethod
    def _sse(frames: list[bytes]) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=b"".join(frames))

    def anthropic(self) -> anthropic.Anthropic:
        http = httpx2.Client(transport=httpx2.MockTransport(self.handle))
        return anthropic.Anthropic(api_key="k", base_url="http://sidecar", http_client=http, max_retries=0)

    def openai(self) -> openai.OpenAI:
        http = httpx2.Client(transport=httpx2.MockTransport(self.handle))
        return openai.OpenAI(api_key="k", base_url="http://sidecar/v1", http_client=http, max_retries=0)


# ------------------------------------------------------------------------------------------------
# Anthropic Messages request -> chat

WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Current weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_FUNCTION: JSON = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": WEATHER_TOOL["input_schema"],
    },
}


def test_messages_request_as_the_sdk_sends_it() -> None:
    fake = FakeSidecar(TEXT_STREAM)
    with fake.anthropic() as client:
        client.messages.create(
            model="qwen2-vl",
            max_tokens=256,
            system=[
                {"type": "text", "text": "You describe images.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be brief."},
            ],
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                        {"type": "text", "text": "with"},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}},
                    ],
                }
            ],
            stop_sequences=["END"],
            # Sampling parameters left this SDK version's signature; older SDKs and raw clients still send them.
            extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 40},
            metadata={"user_id": "user-7"},
            thinking={"type": "enabled", "budget_tokens": 1024},
            tools=[WEATHER_TOOL],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        )
    assert fake.chat_requests == [
        {
            "model": "qwen2-vl",
            "messages": [
                {"role": "system", "content": "You describe images.\n\nBe brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
                        {"type": "text", "text": "with"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}},
                    ],
                },
            ],
            "max_tokens": 256,
            "stop": ["END"],
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "tools": [WEATHER_FUNCTION],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "user": "user-7",
        }
    ]


def test_messages_request_streaming_asks_for_usage() -> None:
    chat = messages_to_chat(
        {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_image_tensors_parts_pass_through_unchanged_and_in_order() -> None:
    second = {"type": "image_tensors", "tensors": {"pixel_values": {"segment": "arena0", "offset": 0}}}
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "first"},
                    TENSORS,
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}},
                    second,
                    {"type": "text", "text": "last"},
                ],
            }
        ],
    }
    content = messages_to_chat(body)["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "first"},
        TENSORS,
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
        second,
        {"type": "text", "text": "last"},
    ]
    assert content[1] is body["messages"][0]["content"][1]  # opaque: the rewritten node itself, not rebuilt


def test_messages_tool_history_becomes_tool_calls_and_tool_messages() -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "Weather in Paris and a photo of it?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "two tools", "signature": "sig"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "camera", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [
                            {"type": "text", "text": "snapshot:"},
                            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
                            TENSORS,
                        ],
                    },
                    {"type": "text", "text": "Summarize."},
                ],
            },
        ],
    }
    assert messages_to_chat(body)["messages"] == [
        {"role": "user", "content": "Weather in Paris and a photo of it?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "toolu_2", "type": "function", "function": {"name": "camera", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "snapshot:"},
        # Chat tool messages cannot carry images: they follow in the user turn, ahead of its own text.
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                TENSORS,
                {"type": "text", "text": "Summarize."},
            ],
        },
    ]


def test_tool_result_images_alone_become_their_own_user_message() -> None:
    body = {
        "model": "m",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "photo?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "camera", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [TENSORS]}]},
        ],
    }
    assert messages_to_chat(body)["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "camera", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "t1", "content": ""},
        {"role": "user", "content": [TENSORS]},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_weather"},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
        ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ],
)
def test_messages_tool_choice(choice: JSON, expected: JSON) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [], "tools": [WEATHER_TOOL], "tool_choice": choice}
    chat = messages_to_chat(body)
    assert {k: v for k, v in chat.items() if k in ("tool_choice", "parallel_tool_calls")} == expected


def test_trailing_assistant_message_is_continued() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "Sun in Greek?"}, {"role": "assistant", "content": "The answer is ("}],
    }
    chat = messages_to_chat(body)
    assert chat["messages"][-1] == {"role": "assistant", "content": "The answer is ("}
    assert chat["continue_final_message"] is True
    assert chat["add_generation_prompt"] is False


def test_messages_unknown_fields_pass_through_and_service_knobs_are_dropped() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "messages": [],
        "repetition_penalty": 1.1,
        "service_tier": "auto",
        "thinking": {"type": "disabled"},
        "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}}},
    }
    assert messages_to_chat(body) == {
        "model": "m",
        "messages": [],
        "max_tokens": 5,
        "repetition_penalty": 1.1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}},
    }


def _with_user_block(block: JSON) -> JSON:
    return {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [block]}]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [],
                "tools": [WEATHER_TOOL, {"type": "computer_20241022", "name": "computer", "display_width_px": 1024}],
            },
            "tools[1].type: 'computer_20241022' cannot be translated to chat completions",
        ),
        (
            _with_user_block({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}),
            # Refused by the walker before any translation: the sidecar does not know the block.
            "messages[0].content[0].type: content part type 'document' is not supported here "
            "(the operator may allow it in limits.allowed_part_types)",
        ),
        (
            _with_user_block({"type": "image", "source": {"type": "file", "file_id": "file_1"}}),
            "messages[0].content[0].source.type: 'file' cannot be translated to chat completions",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            "messages[0].role: 'system' cannot be translated to chat completions",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [], "mcp_servers": [{"type": "url", "url": "https://x"}]},
            "mcp_servers: cannot be translated to chat completions",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [], "system": [{"type": "image", "source": {}}]},
            "system[0].source.type: must be 'base64', 'url' or 'file', got None",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": "hi"},
            "messages: must be an array, got string",
        ),
    ],
)
def test_messages_untranslatable_fields_are_named(body: JSON, message: str) -> None:
    with pytest.raises((TranslationError, SidecarError)) as info:
        messages_to_chat(body)
    assert getattr(info.value, "message", str(info.value)) == message


# ------------------------------------------------------------------------------------------------
# OpenAI Responses request -> chat

WEATHER_RESPONSES_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather",
    "parameters": WEATHER_TOOL["input_schema"],
    "strict": True,
}


def test_responses_request_as_the_sdk_sends_it() -> None:
    fake = FakeSidecar(TEXT_STREAM)
    with fake.openai() as client:
        client.responses.create(
            model="qwen2-vl",
            instructions="You describe images.",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is the weather where this was taken?"},
                        {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "high"},
                        TENSORS,
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Looks like Paris.", "annotations": []}],
                },
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city":"Paris"}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
                {"role": "developer", "content": "Answer in one line."},
            ],
            tools=[WEATHER_RESPONSES_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=200,
            temperature=0.3,
            top_p=0.8,
            parallel_tool_calls=False,
            text={"format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"}, "strict": True}},
            reasoning={"effort": "low"},
            store=True,
            metadata={"trace": "t1"},
            user="user-7",
        )
    assert fake.chat_requests == [
        {
            "model": "qwen2-vl",
            "messages": [
                {"role": "system", "content": "You describe images."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is the weather where this was taken?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}},
                        TENSORS,
                    ],
                },
                {
                    "role": "assistant",
                    "content": "Looks like Paris.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "system", "content": "Answer in one line."},
            ],
            "max_tokens": 200,
            "temperature": 0.3,
            "top_p": 0.8,
            "parallel_tool_calls": False,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "description": "Current weather",
                        "parameters": WEATHER_TOOL["input_schema"],
                        "strict": True,
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "weather", "schema": {"type": "object"}, "strict": True},
            },
            "reasoning_effort": "low",
            "user": "user-7",
        }
    ]


def test_responses_string_input_and_stream() -> None:
    chat = responses_to_chat({"model": "m", "input": "hello", "stream": True})
    assert chat == {
        "model": "m",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_responses_function_output_images_follow_the_tool_messages() -> None:
    chat = responses_to_chat(
        {
            "model": "m",
            "input": [
                {"type": "function_call", "call_id": "c1", "name": "camera", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "camera", "arguments": "{}"},
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [
                        {"type": "input_text", "text": "front"},
                        {"type": "input_image", "image_url": "https://example.com/f.png"},
                    ],
                },
                {"type": "function_call_output", "call_id": "c2", "output": [TENSORS]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ],
        }
    )
    assert chat["messages"] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "camera", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "camera", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "front"},
        {"role": "tool", "tool_call_id": "c2", "content": ""},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/f.png"}}, TENSORS],
        },
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id is not supported by this engine"),
        ({"conversation": "conv_1"}, "conversation is not supported by this engine"),
        ({"background": True}, "background is not supported by this engine"),
        (
            {"tools": [WEATHER_RESPONSES_TOOL, {"type": "web_search"}]},
            "tools[1].type: 'web_search' cannot be translated to chat completions",
        ),
        (
            {"tool_choice": {"type": "file_search"}},
            "tool_choice.type: 'file_search' cannot be translated to chat completions",
        ),
        (
            {"input": [{"type": "item_reference", "id": "msg_1"}]},
            "input[0].type: 'item_reference' cannot be translated to chat completions",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
            "input[0].content[0].file_id: uploaded files cannot be translated to chat completions",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
            "input[0].content[0].type: content part type 'input_file' is not supported here "
            "(the operator may allow it in limits.allowed_part_types)",
        ),
        ({"top_logprobs": 3}, "top_logprobs: log probabilities are not translated from chat completions"),
    ],
)
def test_responses_untranslatable_fields_are_named(extra: JSON, message: str) -> None:
    with pytest.raises((TranslationError, SidecarError)) as info:
        responses_to_chat({"model": "m", "input": "hi", **extra})
    assert getattr(info.value, "message", str(info.value)) == message


def test_responses_store_without_state_is_fine() -> None:
    assert responses_to_chat({"model": "m", "input": "hi", "store": True, "previous_response_id": None}) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
    }


# ------------------------------------------------------------------------------------------------
# Non-streaming answers


def chat_completion(message: JSON, finish_reason: str, **choice: Any) -> JSON:
    return {
        "id": "chatcmpl-xyz",
        "object": "chat.completion",
        "created": 1718000000,
        "model": "qwen2-vl",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason, **choice}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57},
    }


def test_chat_to_messages_text() -> None:
    message = chat_to_messages(chat_completion({"role": "assistant", "content": "A red square."}, "stop"))
    assert message == {
        "id": "msg_xyz",
        "type": "message",
        "role": "assistant",
        "model": "qwen2-vl",
        "content": [{"type": "text", "text": "A red square."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 50, "output_tokens": 7},
    }
    Message.model_validate(message)


def test_chat_to_messages_tool_calls_keep_bad_json_visible() -> None:
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": '}},
        {"id": "call_3", "type": "function", "function": {"name": "ping", "arguments": ""}},
    ]
    message = chat_to_messages(
        chat_completion({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls")
    )
    parsed = Message.model_validate(message)
    assert parsed.stop_reason == "tool_use"
    assert [block.model_dump(exclude_none=True) for block in parsed.content] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {"_raw": '{"tz": '}},
        {"type": "tool_use", "id": "call_3", "name": "ping", "input": {}},
    ]


@pytest.mark.parametrize(
    ("finish_reason", "vllm_stop_reason", "stop_reason", "stop_sequence"),
    [
        ("stop", None, "end_turn", None),
        ("stop", 151645, "end_turn", None),  # a stop token id, not a stop string
        ("stop", "END", "stop_sequence", "END"),
        ("length", None, "max_tokens", None),
        ("tool_calls", None, "tool_use", None),
        ("content_filter", None, "refusal", None),
    ],
)
def test_chat_to_messages_stop_reasons(
    finish_reason: str, vllm_stop_reason: Any, stop_reason: str, stop_sequence: str | None
) -> None:
    chat = chat_completion({"role": "assistant", "content": "x"}, finish_reason, stop_reason=vllm_stop_reason)
    parsed = Message.model_validate(chat_to_messages(chat))
    assert (parsed.stop_reason, parsed.stop_sequence) == (stop_reason, stop_sequence)


def test_chat_to_messages_counts_cache_reads_apart() -> None:
    chat = chat_completion({"role": "assistant", "content": "x"}, "stop")
    chat["usage"]["prompt_tokens_details"] = {"cached_tokens": 32}
    assert chat_to_messages(chat)["usage"] == {"input_tokens": 18, "cache_read_input_tokens": 32, "output_tokens": 7}


def test_non_streaming_messages_through_the_sdk() -> None:
    fake = FakeSidecar(TOOL_STREAM)
    with fake.anthropic() as client:
        message = client.messages.create(
            model="qwen2-vl", max_tokens=100, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL]
        )
    Message.model_validate(message.model_dump())
    assert message.id == "msg_abc123"
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[1].model_dump(exclude_none=True) == {
        "type": "tool_use",
        "id": "chatcmpl-tool-1",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        56,
        64,
        30,
    )


def test_chat_to_responses_text_echoes_the_request() -> None:
    request = {
        "model": "qwen2-vl",
        "input": "hi",
        "instructions": "Be brief.",
        "temperature": 0.5,
        "metadata": {"a": "b"},
    }
    response = chat_to_responses(chat_completion({"role": "assistant", "content": "Hello."}, "stop"), request)
    parsed = Response.model_validate(response)
    assert parsed.id == "resp_xyz"
    assert parsed.status == "completed"
    assert parsed.output_text == "Hello."
    assert parsed.output[0].model_dump(exclude_none=True) == {
        "id": "msg_xyz_0",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello.", "annotations": [], "logprobs": []}],
    }
    assert (parsed.instructions, parsed.temperature, parsed.metadata, parsed.created_at) == (
        "Be brief.",
        0.5,
        {"a": "b"},
        1718000000,
    )
    assert parsed.usage is not None
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (50, 7, 57)


def test_chat_to_responses_tool_calls_and_length() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    response = Response.model_validate(
        chat_to_responses(
            chat_completion({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"), {}
        )
    )
    assert [item.model_dump(exclude_none=True) for item in response.output] == [
        {
            "id": "fc_xyz_0",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        }
    ]
    cut = Response.model_validate(
        chat_to_responses(chat_completion({"role": "assistant", "content": "Once"}, "length"), {})
    )
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"  # type: ignore[union-attr]


def test_non_streaming_responses_through_the_sdk() -> None:
    fake = FakeSidecar(TEXT_STREAM)
    with fake.openai() as client:
        response = client.responses.create(model="qwen2-vl", input="describe")
    assert response.output_text == "A red square."
    assert response.model == "qwen2-vl"
    assert response.usage is not None and response.usage.total_tokens == 99


# ------------------------------------------------------------------------------------------------
# Streams: chat -> Anthropic Messages


def test_messages_text_stream_event_order() -> None:
    payloads = decode(run(chat_stream_to_messages("qwen2-vl", "req-1"), TEXT_STREAM))
    validate_messages_stream(payloads)
    assert payloads == [
        {
            "type": "message_start",
            "message": {
                "id": "msg_req-1",
                "type": "message",
                "role": "assistant",
                "model": "qwen2-vl",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            },
        },
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A red"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " square."}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"input_tokens": 95, "output_tokens": 4},
        },
        {"type": "message_stop"},
    ]


def test_messages_stream_through_the_sdk_matches_the_non_streaming_answer() -> None:
    fake = FakeSidecar(TOOL_STREAM)
    with (
        fake.anthropic() as client,
        client.messages.stream(
            model="qwen2-vl", max_tokens=100, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL]
        ) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Checking."
    assert fake.chat_requests[0]["stream_options"] == {"include_usage": True}
    expected = chat_to_messages(assembled(TOOL_STREAM))
    expected["id"] = "msg_req-1"
    assert Message.model_validate(final.model_dump()).model_dump(exclude_none=True) == Message.model_validate(
        expected
    ).model_dump(exclude_none=True)
    assert final.content[2].model_dump(exclude_none=True) == {
        "type": "tool_use",
        "id": "chatcmpl-tool-2",
        "name": "get_time",
        "input": {"tz": "CET"},
    }


def test_messages_tool_stream_blocks() -> None:
    payloads = decode(run(chat_stream_to_messages("qwen2-vl", "msg_given"), TOOL_STREAM))
    validate_messages_stream(payloads)
    assert payloads[0]["message"]["id"] == "msg_given"
    shapes = [(p["type"], p.get("index"), p.get("delta", {}).get("type")) for p in payloads[2:]]
    assert shapes == [
        ("content_block_start", 0, None),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, None),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, None),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    assert payloads[5]["content_block"] == {
        "type": "tool_use",
        "id": "chatcmpl-tool-1",
        "name": "get_weather",
        "input": {},
    }
    assert payloads[-2]["delta"]["stop_reason"] == "tool_use"
    assert payloads[-2]["usage"] == {"input_tokens": 56, "cache_read_input_tokens": 64, "output_tokens": 30}


@pytest.mark.parametrize(
    ("raw", "stop_reason", "stop_sequence"),
    [(LENGTH_STREAM, "max_tokens", None), (STOP_STRING_STREAM, "stop_sequence", "END")],
)
def test_messages_stream_stop_reasons(raw: bytes, stop_reason: str, stop_sequence: str | None) -> None:
    payloads = decode(run(chat_stream_to_messages("m", "r"), raw))
    validate_messages_stream(payloads)
    assert payloads[-2]["delta"] == {"stop_reason": stop_reason, "stop_sequence": stop_sequence}


def test_messages_stream_error_mid_stream() -> None:
    payloads = decode(run(chat_stream_to_messages("m", "r"), ERROR_STREAM))
    validate_messages_stream(payloads)
    assert [p["type"] for p in payloads] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert payloads[-1] == {"type": "error", "error": {"type": "api_error", "message": "EngineCore died unexpectedly"}}


def test_messages_stream_error_reaches_the_sdk_as_an_exception() -> None:
    fake = FakeSidecar(ERROR_STREAM)
    with fake.anthropic() as client:
        stream = client.messages.stream(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        with stream as events, pytest.raises(anthropic.APIStatusError, match="EngineCore died unexpectedly"):
            for _ in events:
                pass


# ------------------------------------------------------------------------------------------------
# Streams: chat -> Responses

RESPONSES_REQUEST: JSON = {"model": "qwen2-vl", "input": "describe", "stream": True, "instructions": "Be brief."}


def test_responses_text_stream_event_order() -> None:
    payloads = decode(run(chat_stream_to_responses(RESPONSES_REQUEST, "resp_1"), TEXT_STREAM))
    validate_responses_stream(payloads)
    assert [p["type"] for p in payloads] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert payloads[0]["response"]["status"] == "in_progress"
    assert payloads[0]["response"]["output"] == []
    assert [p["delta"] for p in payloads[4:6]] == ["A red", " square."]
    assert payloads[6]["text"] == "A red square."
    final = Response.model_validate(payloads[-1]["response"])
    expected = Response.model_validate(chat_to_responses(assembled(TEXT_STREAM), RESPONSES_REQUEST))
    assert final.id == "resp_1"
    assert final.output_text == "A red square."
    # Same object as the non-streaming answer, up to the ids and the clock.
    ignore = {"id", "created_at", "output"}
    assert final.model_dump(exclude=ignore) == expected.model_dump(exclude=ignore)
    assert [item.model_dump(exclude={"id"}) for item in final.output] == [
        item.model_dump(exclude={"id"}) for item in expected.output
    ]


def test_responses_tool_stream_through_the_sdk() -> None:
    fake = FakeSidecar(TOOL_STREAM)
    with (
        fake.openai() as client,
        client.responses.stream(model="qwen2-vl", input="weather?", tools=[WEATHER_RESPONSES_TOOL]) as stream,
    ):
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert seen.count("response.function_call_arguments.delta") == 3
    assert final.output_text == "Checking."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, orjson.loads(c.arguments), c.status) for c in calls] == [
        ("chatcmpl-tool-1", "get_weather", {"city": "Paris"}, "completed"),
        ("chatcmpl-tool-2", "get_time", {"tz": "CET"}, "completed"),
    ]
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens) == (120, 64)


def test_responses_tool_stream_events() -> None:
    payloads = decode(run(chat_stream_to_responses({"model": "m"}, "resp_2"), TOOL_STREAM))
    validate_responses_stream(payloads)
    done = [p for p in payloads if p["type"] == "response.function_call_arguments.done"]
    assert [(p["item_id"], p["output_index"], p["name"], p["arguments"]) for p in done] == [
        ("fc_2_1", 1, "get_weather", '{"city": "Paris"}'),
        ("fc_2_2", 2, "get_time", '{"tz": "CET"}'),
    ]
    assert [p["output_index"] for p in payloads if p["type"] == "response.output_item.added"] == [0, 1, 2]


def test_responses_length_stream_is_incomplete() -> None:
    payloads = decode(run(chat_stream_to_responses({"model": "m"}, "resp_3"), LENGTH_STREAM))
    validate_responses_stream(payloads)
    assert payloads[-1]["type"] == "response.incomplete"
    final = Response.model_validate(payloads[-1]["response"])
    assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == "Once upon a"
    assert final.output[0].status == "incomplete"  # type: ignore[union-attr]


def test_responses_stream_error_mid_stream() -> None:
    payloads = decode(run(chat_stream_to_responses({"model": "m"}, "resp_4"), ERROR_STREAM))
    validate_responses_stream(payloads)
    assert payloads[-1] == {
        "type": "error",
        "sequence_number": len(payloads) - 1,
        "code": "InternalServerError",
        "message": "EngineCore died unexpectedly",
        "param": None,
    }
    assert "response.completed" not in [p["type"] for p in payloads]


# ------------------------------------------------------------------------------------------------
# Streams: what the engine may get wrong

Factory = Callable[[], StreamTranslator]
TRANSLATORS: list[tuple[str, Factory]] = [
    ("messages", lambda: chat_stream_to_messages("m", "r")),
    ("responses", lambda: chat_stream_to_responses({"model": "m"}, "resp_r")),
]


def error_message(payload: JSON) -> str:
    return str(payload["error"]["message"] if "error" in payload else payload["message"])


def validate(kind: str, payloads: list[JSON]) -> None:
    (validate_messages_stream if kind == "messages" else validate_responses_stream)(payloads)


@pytest.mark.parametrize(("kind", "factory"), TRANSLATORS)
def test_truncated_stream_ends_in_an_error(kind: str, factory: Factory) -> None:
    cut = TEXT_STREAM[: TEXT_STREAM.index(b'" square."')]
    translator = factory()
    payloads = decode(run(translator, cut.rsplit(b"\n\n", 1)[0] + b"\n\n"))
    validate(kind, payloads)
    assert payloads[-1]["type"] == "error"
    assert error_message(payloads[-1]) == "upstream stream ended before the answer was complete"
    assert translator.finish() == []
    assert translator.feed(SSEEvent(None, "[DONE]")) == []


@pytest.mark.parametrize(("kind", "factory"), TRANSLATORS)
def test_stream_without_done_still_completes(kind: str, factory: Factory) -> None:
    payloads = decode(run(factory(), STOP_STRING_STREAM.removesuffix(b"data: [DONE]\n\n")))
    validate(kind, payloads)
    assert payloads[-1]["type"] in ("message_stop", "response.completed")


@pytest.mark.parametrize(("kind", "factory"), TRANSLATORS)
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"data: {not json\n\n", "upstream sent malformed JSON: '{not json'"),
        (b'event: error\ndata: {"message":"overloaded","code":503}\n\n', "overloaded"),
        (b"event: error\ndata: plain text failure\n\n", "plain text failure"),
        (b"data: [DONE]\n\n", "upstream stream ended without any chunk"),
        (b"", "upstream stream ended before the answer was complete"),
    ],
)
def test_engine_failures_become_error_events(kind: str, factory: Factory, raw: bytes, message: str) -> None:
    payloads = decode(run(factory(), raw))
    validate(kind, payloads)
    assert [p["type"] for p in payloads] == ["error"]
    assert error_message(payloads[0]) == message


def test_anthropic_error_type_follows_the_engine_status() -> None:
    raw = b'event: error\ndata: {"message":"overloaded","code":503}\n\n'
    assert decode(run(chat_stream_to_messages("m", "r"), raw))[0]["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize(("kind", "factory"), TRANSLATORS)
def test_interleaved_tool_calls_are_refused(kind: str, factory: Factory) -> None:
    raw = (
        _HEAD
        + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"f"}}]}}]}\n\n'
        + _HEAD
        + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"b","function":{"name":"g"}}]}}]}\n\n'
        + _HEAD
        + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}\n\n'
    )
    payloads = decode(run(factory(), raw))
    validate(kind, payloads)
    assert payloads[-1]["type"] == "error"
    assert "interleaved tool call 0" in error_message(payloads[-1])


def test_tool_arguments_wait_for_the_name() -> None:
    # Some engines send the id first and the name in a later fragment: the block cannot start before it.
    raw = (
        _HEAD + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_9",'
        b'"function":{"arguments":"{\\"a\\""}}]}}]}\n\n'
        + _HEAD
        + b'"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f",'
        b'"arguments":": 1}"}}]}}]}\n\n'
        + _HEAD
        + b'"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    payloads = decode(run(chat_stream_to_messages("m", "r"), raw))
    validate_messages_stream(payloads)
    assert [(p["type"], p.get("delta")) for p in payloads[2:5]] == [
        ("content_block_start", None),
        ("content_block_delta", {"type": "input_json_delta", "partial_json": '{"a": 1}'}),
        ("content_block_stop", None),
    ]
    assert payloads[2]["content_block"]["id"] == "call_9"


def test_unparseable_tool_arguments_round_trip_through_anthropic_history() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{'single': quotes}"}}]
    message = chat_to_messages(
        chat_completion({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls")
    )
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "assistant", "content": message["content"]}]}
    chat = messages_to_chat(body)
    assert chat["messages"][0]["tool_calls"][0]["function"]["arguments"] == "{'single': quotes}"


def test_requests_are_not_mutated() -> None:
    anthropic_body = {
        "model": "m",
        "max_tokens": 5,
        "stream": True,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": [TENSORS]},
                    {"type": "text", "text": "b"},
                ],
            },
        ],
    }
    responses_body = {
        "model": "m",
        "stream": True,
        "input": [
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": [TENSORS]},
            {"role": "user", "content": [{"type": "input_text", "text": "b"}]},
        ],
    }
    for body, translate in ((anthropic_body, messages_to_chat), (responses_body, responses_to_chat)):
        before = orjson.dumps(body)
        translate(body)
        assert orjson.dumps(body) == before


# ------------------------------------------------------------------------------------------------
# Engine errors: whole error answers, and the sidecar's own failures mid-stream

VLLM_ERROR: JSON = {
    "error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}
}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
    ],
)
def test_engine_error_answers_as_anthropic_errors_typed_by_status(status: int, kind: str) -> None:
    # The status decides, not the engine's `type`: OpenAI says invalid_request_error for a 404 too.
    for payload in (VLLM_ERROR, {"error": {**VLLM_ERROR["error"], "type": "invalid_request_error"}}):
        assert chat_error_to_messages(status, payload) == {
            "type": "error",
            "error": {"type": kind, "message": "max_tokens is too large"},
        }


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"object": "error", "message": "flat", "type": "BadRequestError", "code": 400}, "flat"),  # older vLLM
        ({"error": "a bare string"}, "a bare string"),
        ("Internal Server Error", "Internal Server Error"),  # not JSON: its text
        ({"error": {"message": ""}}, "the engine answered HTTP 500"),
        ({}, "the engine answered HTTP 500"),
    ],
)
def test_engine_error_answers_of_every_wrapping_keep_the_engines_message(payload: Any, message: str) -> None:
    assert chat_error_to_messages(500, payload)["error"]["message"] == message
    assert chat_error_to_responses(500, payload)["error"]["message"] == message


def test_engine_error_answers_as_openai_errors_for_responses() -> None:
    assert chat_error_to_responses(400, VLLM_ERROR) == {
        "error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": None}
    }
    openai_style = {"error": {"message": "m", "type": "invalid_request_error", "param": "input", "code": "bad_input"}}
    assert chat_error_to_responses(400, openai_style) == openai_style
    assert chat_error_to_responses(404, "gone")["error"]["type"] == "invalid_request_error"
    assert chat_error_to_responses(503, "busy")["error"] == {
        "message": "busy",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_engine_error_answers_reach_the_sdks_as_their_own_exceptions() -> None:
    def answer(status: int, body: JSON) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(lambda request: httpx2.Response(status, json=body)))

    http = answer(404, chat_error_to_messages(404, VLLM_ERROR))
    client = anthropic.Anthropic(api_key="k", base_url="http://sidecar", http_client=http, max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body == {"type": "error", "error": {"type": "not_found_error", "message": VLLM_MESSAGE}}

    http = answer(429, chat_error_to_responses(429, {"error": {**VLLM_ERROR["error"], "param": "input"}}))
    oai = openai.OpenAI(api_key="k", base_url="http://sidecar/v1", http_client=http, max_retries=0)
    with pytest.raises(openai.RateLimitError) as limited:
        oai.responses.create(model="m", input="hi")
    assert (limited.value.message, limited.value.type, limited.value.param, limited.value.code) == (
        f"Error code: 429 - {VLLM_MESSAGE}",
        "BadRequestError",
        "input",
        None,
    )


VLLM_MESSAGE = "max_tokens is too large"


def test_in_band_anthropic_errors_are_typed_by_the_status_in_code() -> None:
    for payload, kind in (
        (b'{"error":{"message":"m","type":"invalid_request_error","code":404}}', "not_found_error"),
        (b'{"error":{"message":"m","type":"BadRequestError","code":422}}', "invalid_request_error"),
        (b'{"error":{"message":"m","type":"overloaded_error"}}', "overloaded_error"),  # no status: its type
        (b'{"error":{"message":"m","type":"ValueError","code":"oops"}}', "api_error"),
    ):
        frames = decode(run(chat_stream_to_messages("m", "r"), b"data: " + payload + b"\n\n"))
        assert frames == [{"type": "error", "error": {"type": kind, "message": "m"}}]


def test_the_sidecars_own_failure_ends_a_stream_in_the_clients_grammar() -> None:
    error = SidecarError(Cause.UPSTREAM_BAD_RESPONSE, "the engine broke off the stream: gone")
    cut = TEXT_STREAM[: TEXT_STREAM.index(b'" square."')].rsplit(b"\n\n", 1)[0] + b"\n\n"

    messages = chat_stream_to_messages("m", "r")
    frames = [frame for event in events(cut) for frame in messages.feed(event)] + messages.fail(error)
    payloads = decode(frames)
    validate_messages_stream(payloads)
    assert payloads[-1] == {"type": "error", "error": {"type": "api_error", "message": error.message}}
    assert messages.fail(error) == [] and messages.finish() == []  # closed: exactly one error

    responses = chat_stream_to_responses({"model": "m"}, "resp_x")
    frames = [frame for event in events(cut) for frame in responses.feed(event)] + responses.fail(error)
    payloads = decode(frames)
    validate_responses_stream(payloads)
    assert payloads[-1] == {
        "type": "error",
        "sequence_number": len(payloads) - 1,
        "code": "upstream_bad_response",
        "message": error.message,
        "param": None,
    }
    assert responses.fail(error) == [] and responses.finish() == []
    # A stream already complete is not failed after the fact.
    done = chat_stream_to_messages("m", "r")
    run(done, TEXT_STREAM)
    assert done.fail(error) == []


# ------------------------------------------------------------------------------------------------
# OpenAI legacy completions <-> chat

OFFLOAD_REFUSES = "offload mode translates /v1/completions to chat completions, which cannot express"
HI: JSON = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


def test_completions_request_as_the_sdk_sends_it() -> None:
    fake = FakeSidecar(TEXT_STREAM)
    with fake.openai() as client:
        completion = client.completions.create(
            model="qwen2-vl",
            prompt="Describe a red square.",
            max_tokens=7,
            temperature=0.2,
            top_p=0.9,
            n=2,
            stop=["\n\n", "END"],
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            logit_bias={"50256": -100},
            user="user-7",
            extra_body={"top_k": 20, "repetition_penalty": 1.05},
        )
    assert fake.chat_requests == [
        {
            "model": "qwen2-vl",
            "messages": [{"role": "user", "content": "Describe a red square."}],
            "max_tokens": 7,
            "temperature": 0.2,
            "top_p": 0.9,
            "n": 2,
            "stop": ["\n\n", "END"],
            "seed": 42,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.25,
            "logit_bias": {"50256": -100},
            "user": "user-7",
            "top_k": 20,
            "repetition_penalty": 1.05,
        }
    ]
    assert (completion.id, completion.object, completion.model) == ("cmpl-abc123", "text_completion", "qwen2-vl")
    assert [(c.index, c.text, c.logprobs, c.finish_reason) for c in completion.choices] == [
        (0, "A red square.", None, "stop")
    ]
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (95, 4)


def test_completions_stream_through_the_sdk() -> None:
    fake = FakeSidecar(TEXT_STREAM)
    with fake.openai() as client:
        chunks = list(
            client.completions.create(
                model="qwen2-vl",
                prompt=["Describe a red square."],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert fake.chat_requests == [
        {
            "model": "qwen2-vl",
            "messages": [{"role": "user", "content": "Describe a red square."}],
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ]
    assert {(c.id, c.object) for c in chunks} == {("cmpl-abc123", "text_completion")}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "A red square."
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, None, "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 99


def test_completions_prompt_becomes_one_user_message_and_max_tokens_keeps_its_default() -> None:
    for prompt in ("hi", ["hi"]):
        assert completions_to_chat({"model": "m", "prompt": prompt}) == HI
    # An explicit null is the client's own choice (vLLM reads it as "up to the context length").
    assert completions_to_chat({"model": "m", "prompt": "hi", "max_tokens": None}) == {**HI, "max_tokens": None}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_tokens", 5),
        ("temperature", 0.0),
        ("top_p", 0.5),
        ("n", 3),
        ("stop", "END"),
        ("stop", ["a", "b"]),
        ("seed", 7),
        ("presence_penalty", -0.5),
        ("frequency_penalty", 1.5),
        ("stream", True),
        ("stream", False),
        ("stream_options", {"include_usage": True, "continuous_usage_stats": True}),
        ("user", "user-1"),
        ("logit_bias", {"1": 5}),
        # Engine extensions (extra_body), as for the other translations.
        ("top_k", 40),
        ("min_p", 0.05),
        ("repetition_penalty", 1.1),
        ("ignore_eos", True),
    ],
)
def test_completions_options_are_carried_to_chat(name: str, value: Any) -> None:
    assert completions_to_chat({"model": "m", "prompt": "hi", name: value}) == {**HI, name: value}


def test_completions_only_options_that_ask_for_nothing_are_dropped() -> None:
    for quiet in ({"echo": False, "suffix": None, "best_of": 1, "logprobs": None}, {"suffix": "", "logprobs": False}):
        assert completions_to_chat({"model": "m", "prompt": "hi", **quiet}) == HI


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"prompt": [15339, 1917]}, "prompt", f"prompt: {OFFLOAD_REFUSES} a prompt of token ids; send it as text"),
        ({"prompt": [[15339], [1917]]}, "prompt", f"prompt: {OFFLOAD_REFUSES} a prompt of token ids; send it as text"),
        (
            {"prompt": ["a", "b", "c"]},
            "prompt",
            f"prompt: {OFFLOAD_REFUSES} several prompts in one request (got 3); send one per request",
        ),
        ({"echo": True}, "echo", f"echo: {OFFLOAD_REFUSES} echo (the prompt repeated in the answer)"),
        ({"suffix": "}\n"}, "suffix", f"suffix: {OFFLOAD_REFUSES} suffix (text to follow the completion)"),
        ({"best_of": 3}, "best_of", f"best_of: {OFFLOAD_REFUSES} best_of=3 (the best of several completions)"),
        ({"logprobs": 5}, "logprobs", f"logprobs: {OFFLOAD_REFUSES} logprobs=5 (completions-style log probabilities)"),
        # 0 still asks for the sampled token's log probability.
        ({"logprobs": 0}, "logprobs", f"logprobs: {OFFLOAD_REFUSES} logprobs=0 (completions-style log probabilities)"),
        ({"prompt": None}, "prompt", "prompt: is required"),
        ({"prompt": []}, "prompt", "prompt: expected a string or an array of exactly one string"),
    ],
)
def test_completions_untranslatable_options_are_refused_by_name(extra: JSON, param: str, message: str) -> None:
    with pytest.raises(TranslationError) as caught:
        completions_to_chat({"model": "m", "prompt": "hi", **extra})
    assert (str(caught.value), caught.value.param) == (message, param)


def test_completions_request_is_not_mutated() -> None:
    body = {"model": "m", "prompt": ["hi"], "stream": True, "stream_options": {"include_usage": True}, "echo": False}
    before = orjson.dumps(body)
    completions_to_chat(body)
    assert orjson.dumps(body) == before


def test_chat_to_completions_maps_every_choice() -> None:
    chat = chat_completion({"role": "assistant", "content": "A red square."}, "stop", stop_reason=None)
    second = {
        "index": 1,
        "message": {"role": "assistant", "content": None},
        "logprobs": None,
        "finish_reason": "length",
    }
    chat["choices"].append(second)
    chat["system_fingerprint"] = "fp_1"
    completion = chat_to_completions(chat, "asked-for")
    assert completion == {
        "id": "cmpl-xyz",
        "object": "text_completion",
        "created": 1718000000,
        "model": "qwen2-vl",
        "choices": [
            {"index": 0, "text": "A red square.", "logprobs": None, "finish_reason": "stop", "stop_reason": None},
            {"index": 1, "text": "", "logprobs": None, "finish_reason": "length"},
        ],
        "system_fingerprint": "fp_1",
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57},
    }
    Completion.model_validate(completion)


def test_chat_to_completions_fills_in_what_the_engine_left_out() -> None:
    completion = chat_to_completions({"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}, "asked")
    assert completion["id"].startswith("cmpl-") and len(completion["id"]) > len("cmpl-")
    assert (completion["model"], completion["choices"][0]["index"]) == ("asked", 0)
    assert isinstance(completion["created"], int) and "usage" not in completion
    Completion.model_validate(completion)


def completion_events(frames: list[bytes]) -> list[Any]:
    """The client's view: unnamed `data:` events, as OpenAI streams them; `[DONE]` as that string."""
    parsed = SSEParser().feed(b"".join(frames))
    assert len(parsed) == len(frames) and all(event.event is None for event in parsed)
    return [event.data if event.data == "[DONE]" else orjson.loads(event.data) for event in parsed]


def text_choice(text: str, finish_reason: str | None = None, index: int = 0, **extra: Any) -> JSON:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, **extra}


def test_completions_stream_maps_each_chunk_and_keeps_done() -> None:
    payloads = completion_events(run(chat_stream_to_completions("asked-for", "cmpl-own"), TEXT_STREAM))
    head = {"id": "cmpl-abc123", "object": "text_completion", "created": 1718000000, "model": "qwen2-vl"}
    assert payloads == [
        {**head, "choices": [text_choice("")]},
        {**head, "choices": [text_choice("A red")]},
        {**head, "choices": [text_choice(" square.")]},
        {**head, "choices": [text_choice("", "stop", stop_reason=None)]},
        {**head, "choices": [], "usage": {"prompt_tokens": 95, "total_tokens": 99, "completion_tokens": 4}},
        "[DONE]",
    ]
    whole = chat_to_completions(assembled(TEXT_STREAM), "asked-for")
    assert "".join(c["text"] for p in payloads[:-1] for c in p["choices"]) == whole["choices"][0]["text"]


@pytest.mark.parametrize(
    ("raw", "last"),
    [
        (LENGTH_STREAM, text_choice(" a", "length", stop_reason=None)),
        (STOP_STRING_STREAM, text_choice("", "stop", stop_reason="END")),
    ],
)
def test_completions_stream_carries_the_finish_reason(raw: bytes, last: JSON) -> None:
    payloads = completion_events(run(chat_stream_to_completions("m", "cmpl-x"), raw))
    assert payloads[-1] == "[DONE]"
    assert [p["choices"][-1] for p in payloads[:-1] if p["choices"]][-1] == last


def test_completions_stream_without_ids_or_done_keeps_one_id_and_still_completes() -> None:
    # Two choices (n=2), no id or model from the engine, and no [DONE].
    raw = (
        b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null},'
        b'{"index":1,"delta":{"content":"b"},"finish_reason":null}]}\n\n'
        b'data: {"object":"chat.completion.chunk","choices":[{"index":1,"delta":{},"finish_reason":"stop"},'
        b'{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
    )
    payloads = completion_events(run(chat_stream_to_completions("asked-for", "cmpl-own"), raw))
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert {(p["id"], p["model"]) for p in chunks} == {("cmpl-own", "asked-for")}
    assert [p["choices"] for p in chunks] == [
        [text_choice("a"), text_choice("b", index=1)],
        [text_choice("", "stop", index=1), text_choice("", "length")],
    ]


def _cut(raw: bytes) -> bytes:
    return raw[: raw.index(b'" square."')].rsplit(b"\n\n", 1)[0] + b"\n\n"


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (ERROR_STREAM, {"message": "EngineCore died unexpectedly", "type": "InternalServerError"}),
        (b'data: {"error":{"message":"bad n","code":400}}\n\n', {"message": "bad n", "type": "invalid_request_error"}),
        (
            b'event: error\ndata: {"message":"overloaded","code":503}\n\n',
            {"message": "overloaded", "type": "server_error"},
        ),
        (b"event: error\ndata: plain text failure\n\n", {"message": "plain text failure", "type": "server_error"}),
        (b"data: {not json\n\n", {"message": "upstream sent malformed JSON: '{not json'", "type": "server_error"}),
        (b"data: [DONE]\n\n", {"message": "upstream stream ended without any chunk", "type": "server_error"}),
        (b"", {"message": "upstream stream ended before the answer was complete", "type": "server_error"}),
        (
            _cut(TEXT_STREAM),
            {"message": "upstream stream ended before the answer was complete", "type": "server_error"},
        ),
    ],
)
def test_completions_stream_failures_end_in_one_openai_error_event(raw: bytes, error: JSON) -> None:
    translator = chat_stream_to_completions("m", "cmpl-x")
    payloads = completion_events(run(translator, raw))
    # Last, and nothing after it: not even the engine's [DONE] that followed its in-band error.
    assert payloads[-1] == {"error": {**error, "param": None, "code": None}}
    assert all(isinstance(p, dict) and "error" not in p for p in payloads[:-1])
    assert translator.finish() == [] and translator.feed(SSEEvent(None, "[DONE]")) == []


def test_completions_stream_error_reaches_the_sdk_as_an_exception() -> None:
    fake = FakeSidecar(ERROR_STREAM)
    with fake.openai() as client:
        stream = client.completions.create(model="m", prompt="hi", stream=True)
        texts: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            texts.extend(chunk.choices[0].text for chunk in stream)
    assert texts == ["Half an"]
    assert caught.value.message == "EngineCore died unexpectedly"


def test_the_sidecars_own_failure_ends_a_completions_stream_in_openai_form() -> None:
    error = SidecarError(Cause.UPSTREAM_BAD_RESPONSE, "the engine broke off the stream: gone")
    translator = chat_stream_to_completions("m", "cmpl-x")
    frames = [frame for event in events(_cut(TEXT_STREAM)) for frame in translator.feed(event)]
    payloads = completion_events(frames + translator.fail(error))
    assert payloads[-1] == {
        "error": {"message": error.message, "type": "upstream_error", "param": None, "code": "upstream_bad_response"}
    }
    assert translator.fail(error) == [] and translator.finish() == []
    done = chat_stream_to_completions("m", "cmpl-x")
    run(done, TEXT_STREAM)
    assert done.fail(error) == []


def test_engine_error_answers_keep_openais_shape_for_completions() -> None:
    assert chat_error_to_completions(400, VLLM_ERROR) == {
        "error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": None}
    }
    openai_style = {"error": {"message": "m", "type": "invalid_request_error", "param": "prompt", "code": "bad"}}
    assert chat_error_to_completions(400, openai_style) == openai_style
    assert chat_error_to_completions(502, "Bad Gateway") == {
        "error": {"message": "Bad Gateway", "type": "server_error", "param": None, "code": None}
    }
