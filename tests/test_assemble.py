"""Tests for sidecar.assemble: streams written as the engines send them, down to the SSE bytes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import orjson
import pytest
from anthropic.types import Message
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion

from sidecar.answer_shapes import Engine
from sidecar.assemble import Kind, StreamError, assembler_for, can_upgrade, upgrade_refusal, upgrade_request
from sidecar.sse import SSEEvent, SSEParser

from .conftest import normalised


def assemble(kind: Kind, body: bytes, chunk_size: int | None = None, engine: Engine = "generic") -> dict[str, Any]:
    parser = SSEParser()
    assembler = assembler_for(kind, engine)
    step = chunk_size or len(body) or 1
    for start in range(0, len(body), step):
        for event in parser.feed(body[start : start + step]):
            assembler.add(event)
    for event in parser.close():
        assembler.add(event)
    return assembler.result()


def assemble_all_ways(kind: Kind, body: bytes, engine: Engine = "generic") -> dict[str, Any]:
    """Assemble whole and in 7-byte chunks; the answer must not depend on network chunking."""
    whole = assemble(kind, body, engine=engine)
    assert assemble(kind, body, chunk_size=7, engine=engine) == whole
    return whole


# ------------------------------------------------------------------------------------------------
# upgrade_request / can_upgrade


def test_upgrade_chat_sets_stream_and_usage_without_mutating() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    snapshot = orjson.dumps(body)
    upgraded = upgrade_request("chat", body)
    assert upgraded == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert orjson.dumps(body) == snapshot
    assert upgraded is not body


def test_upgrade_merges_existing_stream_options() -> None:
    options = {"continuous_usage_stats": True, "include_usage": False}
    body: dict[str, Any] = {"model": "m", "prompt": "p", "stream_options": options}
    upgraded = upgrade_request("completions", body)
    assert upgraded["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert options == {"continuous_usage_stats": True, "include_usage": False}
    assert body["stream_options"] is options
    assert "stream" not in body


def test_upgrade_replaces_non_dict_stream_options() -> None:
    upgraded = upgrade_request("chat", {"stream_options": None})
    assert upgraded["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("kind", ["responses", "messages"])
def test_upgrade_responses_and_messages_only_set_stream(kind: Kind) -> None:
    body: dict[str, Any] = {"model": "m", "input": "x"}
    assert upgrade_request(kind, body) == {"model": "m", "input": "x", "stream": True}
    assert body == {"model": "m", "input": "x"}


@pytest.mark.parametrize("kind", ["chat", "completions", "responses", "messages"])
def test_can_upgrade(kind: Kind) -> None:
    assert can_upgrade(kind, {"model": "m"})
    assert can_upgrade(kind, {"model": "m", "stream": False})
    assert can_upgrade(kind, {"model": "m", "stream": None})
    assert not can_upgrade(kind, {"model": "m", "stream": True})


def test_assembler_for_unknown_kind() -> None:
    with pytest.raises(ValueError):
        assembler_for("embeddings")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# chat

CHAT_TEXT = (
    b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1730000000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1730000000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1",'
    b'"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\n\n'
    b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1730000000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1",'
    b'"choices":[{"index":0,"delta":{"content":", w\xc3\xb6rld!"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1730000000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1730000000,'
    b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_0ba0d124f1",'
    b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13,'
    b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}\n\n'
    b"data: [DONE]\n\n"
)

CHAT_TEXT_RESULT = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "created": 1730000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, w\u00f6rld!"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 4,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
    "system_fingerprint": "fp_0ba0d124f1",
    "service_tier": "default",
}


def test_chat_text() -> None:
    result = assemble_all_ways("chat", CHAT_TEXT)
    assert result == CHAT_TEXT_RESULT
    ChatCompletion.model_validate(result)


def test_chat_done_flag() -> None:
    assembler = assembler_for("chat")
    done_after_each = []
    for event in SSEParser().feed(CHAT_TEXT):
        assembler.add(event)
        done_after_each.append(assembler.done)
    assert done_after_each == [False] * 5 + [True]
    # Anything after [DONE] is ignored, even garbage.
    assembler.add(SSEEvent(None, "not json"))
    assert assembler.result() == CHAT_TEXT_RESULT


def _vllm_chunk(choices: str, usage: str = "") -> bytes:
    tail = f',"usage":{usage}' if usage else ""
    return (
        'data: {"id":"chatcmpl-7f3e","object":"chat.completion.chunk","created":1730000100,'
        f'"model":"Qwen/Qwen2.5-VL-7B-Instruct","choices":{choices}{tail}}}\n\n'
    ).encode()


# vLLM with the hermes tool parser: two parallel calls, arguments in pieces, the second call's first
# fragment arriving before the first call's arguments are complete.
CHAT_TOOLS = b"".join(
    [
        _vllm_chunk('[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'),
        _vllm_chunk(
            '[{"index":0,"delta":{"tool_calls":[{"id":"chatcmpl-tool-a1","type":"function","index":0,'
            '"function":{"name":"get_weather","arguments":""}}]},"logprobs":null,"finish_reason":null}]'
        ),
        _vllm_chunk(
            '[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": "}}]},'
            '"logprobs":null,"finish_reason":null}]'
        ),
        _vllm_chunk(
            '[{"index":0,"delta":{"tool_calls":[{"id":"chatcmpl-tool-b2","type":"function","index":1,'
            '"function":{"name":"get_time","arguments":"{\\"tz\\""}}]},"logprobs":null,"finish_reason":null}]'
        ),
        _vllm_chunk(
            '[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\"Paris\\"}"}}]},'
            '"logprobs":null,"finish_reason":null}]'
        ),
        _vllm_chunk(
            '[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":": \\"CET\\"}"}}]},'
            '"logprobs":null,"finish_reason":null}]'
        ),
        _vllm_chunk(
            '[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"tool_calls","stop_reason":null}]'
        ),
        _vllm_chunk("[]", '{"prompt_tokens":120,"total_tokens":160,"completion_tokens":40}'),
        b"data: [DONE]\n\n",
    ]
)


def test_chat_parallel_tool_calls() -> None:
    result = assemble_all_ways("chat", CHAT_TOOLS)
    assert result == {
        "id": "chatcmpl-7f3e",
        "object": "chat.completion",
        "created": 1730000100,
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "chatcmpl-tool-a1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "chatcmpl-tool-b2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                        },
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 120, "total_tokens": 160, "completion_tokens": 40},
    }
    ChatCompletion.model_validate(result)


def test_chat_tool_call_content_null_and_repeated_names() -> None:
    # OpenAI sends content null alongside tool calls: the message keeps content None. Some engines
    # repeat the id/name in every fragment: they must not be concatenated.
    body = b"".join(
        [
            _vllm_chunk(
                '[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,'
                '"id":"call_1","type":"function","function":{"name":"f","arguments":"{\\"a\\""}}]},'
                '"finish_reason":null}]'
            ),
            _vllm_chunk(
                '[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","function":{"name":"f",'
                '"arguments":":1}"}}]},"finish_reason":"tool_calls"}]'
            ),
            b"data: [DONE]\n\n",
        ]
    )
    message = assemble("chat", body)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}],
    }


def test_chat_tool_calls_without_index() -> None:
    body = b"".join(
        [
            _vllm_chunk('[{"index":0,"delta":{"tool_calls":[{"id":"a","function":{"name":"f","arguments":"{"}}]}}]'),
            _vllm_chunk('[{"index":0,"delta":{"tool_calls":[{"function":{"arguments":"}"}}]}}]'),
            _vllm_chunk(
                '[{"index":0,"delta":{"tool_calls":[{"id":"b","function":{"name":"g","arguments":"[]"}}]},'
                '"finish_reason":"tool_calls"}]'
            ),
            b"data: [DONE]\n\n",
        ]
    )
    calls = assemble("chat", body)["choices"][0]["message"]["tool_calls"]
    assert calls == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "[]"}},
    ]


def test_chat_legacy_function_call() -> None:
    body = b"".join(
        [
            _vllm_chunk('[{"index":0,"delta":{"role":"assistant","function_call":{"name":"f","arguments":""}}}]'),
            _vllm_chunk('[{"index":0,"delta":{"function_call":{"arguments":"{\\"x\\":"}}}]'),
            _vllm_chunk('[{"index":0,"delta":{"function_call":{"arguments":"2}"}},"finish_reason":"function_call"}]'),
            b"data: [DONE]\n\n",
        ]
    )
    assert assemble("chat", body)["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x":2}'}},
            "logprobs": None,
            "finish_reason": "function_call",
        }
    ]


# n=2: the two choices interleave, and one chunk carries both.
CHAT_N2 = b"".join(
    [
        _vllm_chunk(
            '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null},'
            '{"index":1,"delta":{"role":"assistant","content":""},"finish_reason":null}]'
        ),
        _vllm_chunk('[{"index":1,"delta":{"content":"Bon"},"finish_reason":null}]'),
        _vllm_chunk('[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]'),
        _vllm_chunk(
            '[{"index":1,"delta":{"content":"jour"},"finish_reason":null},'
            '{"index":0,"delta":{"content":"lo"},"finish_reason":null}]'
        ),
        _vllm_chunk('[{"index":1,"delta":{"content":""},"finish_reason":"stop","stop_reason":null}]'),
        _vllm_chunk('[{"index":0,"delta":{"content":"!"},"finish_reason":"length","stop_reason":null}]'),
        _vllm_chunk("[]", '{"prompt_tokens":5,"total_tokens":12,"completion_tokens":7}'),
        b"data: [DONE]\n\n",
    ]
)


def test_chat_two_choices_interleaved() -> None:
    result = assemble_all_ways("chat", CHAT_N2)
    assert result["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!"},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Bonjour"},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        },
    ]
    assert result["usage"] == {"prompt_tokens": 5, "total_tokens": 12, "completion_tokens": 7}
    ChatCompletion.model_validate(result)


def test_chat_usage_only_final_chunk() -> None:
    # The usage chunk has no choices; it must neither add a choice nor be lost. Without include_usage
    # support upstream, usage is None.
    with_usage = assemble("chat", CHAT_TEXT)
    assert len(with_usage["choices"]) == 1
    assert with_usage["usage"]["total_tokens"] == 13
    without = CHAT_TEXT.replace(CHAT_TEXT.split(b"\n\n")[4] + b"\n\n", b"")
    assert assemble("chat", without)["usage"] is None


def test_chat_continuous_usage_last_wins() -> None:
    body = b"".join(
        [
            _vllm_chunk('[{"index":0,"delta":{"content":"a"}}]', '{"prompt_tokens":3,"completion_tokens":1}'),
            _vllm_chunk(
                '[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]',
                '{"prompt_tokens":3,"completion_tokens":2}',
            ),
            b"data: [DONE]\n\n",
        ]
    )
    assert assemble("chat", body)["usage"] == {"prompt_tokens": 3, "completion_tokens": 2}


def test_chat_reasoning_content() -> None:
    body = b"".join(
        [
            _vllm_chunk('[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]'),
            _vllm_chunk('[{"index":0,"delta":{"reasoning_content":"The user"},"finish_reason":null}]'),
            _vllm_chunk('[{"index":0,"delta":{"reasoning_content":" greets me."},"finish_reason":null}]'),
            _vllm_chunk('[{"index":0,"delta":{"content":"Hi there."},"finish_reason":null}]'),
            _vllm_chunk('[{"index":0,"delta":{"content":""},"finish_reason":"stop","stop_reason":null}]'),
            _vllm_chunk("[]", '{"prompt_tokens":10,"total_tokens":20,"completion_tokens":10}'),
            b"data: [DONE]\n\n",
        ]
    )
    assert assemble_all_ways("chat", body)["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hi there.",
        "reasoning_content": "The user greets me.",
    }


def test_chat_reasoning_field_of_newer_vllm() -> None:
    body = b"".join(
        [
            _vllm_chunk('[{"index":0,"delta":{"role":"assistant","reasoning":"hmm"}}]'),
            _vllm_chunk('[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]'),
            b"data: [DONE]\n\n",
        ]
    )
    assert assemble("chat", body)["choices"][0]["message"] == {
        "role": "assistant",
        "content": "ok",
        "reasoning": "hmm",
    }


def test_chat_refusal() -> None:
    body = b"".join(
        [
            _vllm_chunk('[{"index":0,"delta":{"role":"assistant","content":null,"refusal":""}}]'),
            _vllm_chunk('[{"index":0,"delta":{"refusal":"I can\'t help"}}]'),
            _vllm_chunk('[{"index":0,"delta":{"refusal":" with that."},"finish_reason":"stop"}]'),
            b"data: [DONE]\n\n",
        ]
    )
    assert assemble("chat", body)["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": "I can't help with that.",
    }


def test_chat_logprobs_concatenated() -> None:
    def lp(token: str, value: float) -> str:
        return f'{{"token":"{token}","logprob":{value},"bytes":null,"top_logprobs":[]}}'

    body = b"".join(
        [
            _vllm_chunk(f'[{{"index":0,"delta":{{"content":"A"}},"logprobs":{{"content":[{lp("A", -0.5)}]}}}}]'),
            _vllm_chunk(
                f'[{{"index":0,"delta":{{"content":"BC"}},"logprobs":{{"content":[{lp("B", -1.0)},'
                f'{lp("C", -1.5)}],"refusal":null}},"finish_reason":"stop"}}]'
            ),
            b"data: [DONE]\n\n",
        ]
    )
    logprobs = assemble("chat", body)["choices"][0]["logprobs"]
    assert logprobs == {
        "content": [
            {"token": "A", "logprob": -0.5, "bytes": None, "top_logprobs": []},
            {"token": "B", "logprob": -1.0, "bytes": None, "top_logprobs": []},
            {"token": "C", "logprob": -1.5, "bytes": None, "top_logprobs": []},
        ],
        "refusal": None,
    }


def test_chat_stop_reason_kept() -> None:
    body = _vllm_chunk('[{"index":0,"delta":{"content":"x"},"finish_reason":"stop","stop_reason":"</s>"}]')
    assert assemble("chat", body + b"data: [DONE]\n\n")["choices"][0]["stop_reason"] == "</s>"


def test_chat_without_done_accepted_when_every_choice_finished() -> None:
    body = CHAT_TEXT.replace(b"data: [DONE]\n\n", b"")
    assert assemble("chat", body) == CHAT_TEXT_RESULT


def test_chat_error_mid_stream_vllm() -> None:
    body = CHAT_TEXT.split(b"\n\n")[0] + b"\n\n" + CHAT_TEXT.split(b"\n\n")[1] + b"\n\n"
    body += (
        b'data: {"error": {"object": "error", "message": "The decoder prompt is too long", '
        b'"type": "BadRequestError", "param": null, "code": 400}}\n\n'
        b"data: [DONE]\n\n"
    )
    with pytest.raises(StreamError) as info:
        assemble("chat", body)
    assert info.value.upstream_error == {
        "object": "error",
        "message": "The decoder prompt is too long",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    assert "The decoder prompt is too long" in str(info.value)


def test_chat_error_flat_object() -> None:
    with pytest.raises(StreamError) as info:
        assemble("chat", b'data: {"object":"error","message":"boom","type":"InternalServerError","code":500}\n\n')
    assert info.value.upstream_error == {
        "object": "error",
        "message": "boom",
        "type": "InternalServerError",
        "code": 500,
    }


def test_chat_error_typed_sse_event_with_non_json_data() -> None:
    with pytest.raises(StreamError) as info:
        assemble("chat", b"event: error\ndata: upstream exploded\n\n")
    assert info.value.upstream_error == {"message": "upstream exploded"}


def test_chat_truncated() -> None:
    cut = CHAT_TEXT.index(b"data:", CHAT_TEXT.index(b"Hello"))  # after the "Hello" chunk
    with pytest.raises(StreamError, match=r"before \[DONE\]"):
        assemble("chat", CHAT_TEXT[:cut])
    # Cut in the middle of a JSON payload: the flushed half-event is unparseable.
    with pytest.raises(StreamError, match="unparseable JSON"):
        assemble("chat", CHAT_TEXT[: cut + 40])


def test_chat_truncated_with_one_of_two_choices_finished() -> None:
    cut = CHAT_N2.index(b'"finish_reason":"length"')
    body = CHAT_N2[: CHAT_N2.rindex(b"data:", 0, cut)]
    with pytest.raises(StreamError):
        assemble("chat", body)


@pytest.mark.parametrize("kind", ["chat", "completions", "responses", "messages"])
def test_empty_stream(kind: Kind) -> None:
    with pytest.raises(StreamError):
        assemble(kind, b"")
    with pytest.raises(StreamError):
        assemble(kind, b": ping\n\n")


def test_chat_done_only() -> None:
    with pytest.raises(StreamError, match="without any chunk"):
        assemble("chat", b"data: [DONE]\n\n")


# ------------------------------------------------------------------------------------------------
# completions


def _cmpl_chunk(choices: str, usage: str = "null") -> bytes:
    return (
        'data: {"id":"cmpl-9a1b","object":"text_completion","created":1730000200,'
        f'"model":"meta-llama/Llama-3.1-8B","choices":{choices},"usage":{usage}}}\n\n'
    ).encode()


COMPLETIONS_N2 = b"".join(
    [
        _cmpl_chunk(
            '[{"index":0,"text":" Paris","logprobs":{"text_offset":[20],"token_logprobs":[-0.1],'
            '"tokens":[" Paris"],"top_logprobs":[{" Paris":-0.1}]},"finish_reason":null,"stop_reason":null}]'
        ),
        _cmpl_chunk(
            '[{"index":1,"text":" Lyon","logprobs":{"text_offset":[20],"token_logprobs":[-2.3],'
            '"tokens":[" Lyon"],"top_logprobs":[{" Paris":-0.1}]},"finish_reason":null,"stop_reason":null}]'
        ),
        _cmpl_chunk(
            '[{"index":0,"text":".","logprobs":{"text_offset":[26],"token_logprobs":[-0.01],'
            '"tokens":["."],"top_logprobs":[{".":-0.01}]},"finish_reason":"stop","stop_reason":"\\n"}]'
        ),
        _cmpl_chunk(
            '[{"index":1,"text":"?","logprobs":{"text_offset":[25],"token_logprobs":[-1.2],'
            '"tokens":["?"],"top_logprobs":[{"?":-1.2}]},"finish_reason":"length","stop_reason":null}]'
        ),
        _cmpl_chunk("[]", '{"prompt_tokens":6,"total_tokens":10,"completion_tokens":4}'),
        b"data: [DONE]\n\n",
    ]
)


def test_completions_two_choices() -> None:
    result = assemble_all_ways("completions", COMPLETIONS_N2)
    assert result == {
        "id": "cmpl-9a1b",
        "object": "text_completion",
        "created": 1730000200,
        "model": "meta-llama/Llama-3.1-8B",
        "choices": [
            {
                "index": 0,
                "text": " Paris.",
                "logprobs": {
                    "text_offset": [20, 26],
                    "token_logprobs": [-0.1, -0.01],
                    "tokens": [" Paris", "."],
                    "top_logprobs": [{" Paris": -0.1}, {".": -0.01}],
                },
                "finish_reason": "stop",
                "stop_reason": "\n",
            },
            {
                "index": 1,
                "text": " Lyon?",
                "logprobs": {
                    "text_offset": [20, 25],
                    "token_logprobs": [-2.3, -1.2],
                    "tokens": [" Lyon", "?"],
                    "top_logprobs": [{" Paris": -0.1}, {"?": -1.2}],
                },
                "finish_reason": "length",
                "stop_reason": None,
            },
        ],
        "usage": {"prompt_tokens": 6, "total_tokens": 10, "completion_tokens": 4},
    }
    Completion.model_validate(result)


def test_completions_openai_shape_without_logprobs() -> None:
    body = (
        b'data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[{"text":"Hi","index":0,'
        b'"logprobs":null,"finish_reason":null}],"model":"gpt-3.5-turbo-instruct","system_fingerprint":null}\n\n'
        b'data: {"id":"cmpl-1","object":"text_completion","created":1,"choices":[{"text":"","index":0,'
        b'"logprobs":null,"finish_reason":"length"}],"model":"gpt-3.5-turbo-instruct","system_fingerprint":null}\n\n'
        b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"gpt-3.5-turbo-instruct",'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2},"choices":[]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert assemble("completions", body) == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [{"index": 0, "text": "Hi", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def test_completions_error_mid_stream() -> None:
    body = COMPLETIONS_N2.split(b"\n\n")[0] + b"\n\n"
    body += (
        b'data: {"error": {"message": "CUDA out of memory", "type": "InternalServerError", '
        b'"param": null, "code": 500}}\n\n'
    )
    with pytest.raises(StreamError) as info:
        assemble("completions", body)
    assert info.value.upstream_error == {
        "message": "CUDA out of memory",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }


def test_completions_truncated() -> None:
    body = b"".join(part + b"\n\n" for part in COMPLETIONS_N2.split(b"\n\n")[:3])
    # Choice 0 finished, choice 1 did not, and no [DONE].
    with pytest.raises(StreamError, match=r"before \[DONE\]"):
        assemble("completions", body)


# ------------------------------------------------------------------------------------------------
# responses

_RESPONSE_BASE: dict[str, Any] = {
    "id": "resp_67ccd2bed1ec8190",
    "object": "response",
    "created_at": 1741476542,
    "model": "gpt-4.1-2025-04-14",
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "temperature": 1.0,
    "top_p": 1.0,
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "metadata": {},
}
_MESSAGE_ITEM = {
    "id": "msg_67ccd2bf17f0",
    "type": "message",
    "status": "completed",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "Hi there!", "annotations": []}],
}
RESPONSE_COMPLETED = {
    **_RESPONSE_BASE,
    "status": "completed",
    "output": [_MESSAGE_ITEM],
    "usage": {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    },
}


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _responses_prefix() -> bytes:
    in_progress = {**_RESPONSE_BASE, "status": "in_progress", "output": [], "usage": None}
    text_part = {"type": "output_text", "text": "", "annotations": []}
    ids = {"item_id": "msg_67ccd2bf17f0", "output_index": 0, "content_index": 0}
    return b"".join(
        [
            _sse("response.created", {"type": "response.created", "sequence_number": 0, "response": in_progress}),
            _sse(
                "response.in_progress",
                {"type": "response.in_progress", "sequence_number": 1, "response": in_progress},
            ),
            _sse(
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "sequence_number": 2,
                    "output_index": 0,
                    "item": {**_MESSAGE_ITEM, "status": "in_progress", "content": []},
                },
            ),
            _sse(
                "response.content_part.added",
                {"type": "response.content_part.added", "sequence_number": 3, **ids, "part": text_part},
            ),
            _sse(
                "response.output_text.delta",
                {"type": "response.output_text.delta", "sequence_number": 4, **ids, "delta": "Hi"},
            ),
            _sse(
                "response.output_text.delta",
                {"type": "response.output_text.delta", "sequence_number": 5, **ids, "delta": " there!"},
            ),
        ]
    )


def _responses_suffix(terminal: str, response: dict[str, Any]) -> bytes:
    ids = {"item_id": "msg_67ccd2bf17f0", "output_index": 0, "content_index": 0}
    return b"".join(
        [
            _sse(
                "response.output_text.done",
                {"type": "response.output_text.done", "sequence_number": 6, **ids, "text": "Hi there!"},
            ),
            _sse(
                "response.content_part.done",
                {
                    "type": "response.content_part.done",
                    "sequence_number": 7,
                    **ids,
                    "part": _MESSAGE_ITEM["content"][0],
                },
            ),
            _sse(
                "response.output_item.done",
                {"type": "response.output_item.done", "sequence_number": 8, "output_index": 0, "item": _MESSAGE_ITEM},
            ),
            _sse(terminal, {"type": terminal, "sequence_number": 9, "response": response}),
        ]
    )


def test_responses_completed() -> None:
    body = _responses_prefix() + _responses_suffix("response.completed", RESPONSE_COMPLETED)
    result = assemble_all_ways("responses", body)
    # The terminal event's response object is the answer, verbatim.
    assert result == RESPONSE_COMPLETED


def test_responses_done_flag_and_trailing_events_ignored() -> None:
    body = _responses_prefix() + _responses_suffix("response.completed", RESPONSE_COMPLETED)
    assembler = assembler_for("responses")
    for event in SSEParser().feed(body):
        assert not assembler.done
        assembler.add(event)
    assert assembler.done
    assembler.add(SSEEvent("error", '{"type":"error","message":"late"}'))
    assert assembler.result() == RESPONSE_COMPLETED


def test_responses_incomplete_is_a_result() -> None:
    incomplete = {
        **RESPONSE_COMPLETED,
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
    }
    body = _responses_prefix() + _responses_suffix("response.incomplete", incomplete)
    assert assemble("responses", body) == incomplete


def test_responses_failed_is_a_result() -> None:
    failed = {
        **_RESPONSE_BASE,
        "status": "failed",
        "output": [],
        "usage": None,
        "error": {"code": "server_error", "message": "The model failed to generate a response."},
    }
    body = _responses_prefix() + _sse(
        "response.failed", {"type": "response.failed", "sequence_number": 6, "response": failed}
    )
    assert assemble("responses", body) == failed


def test_responses_error_event() -> None:
    body = _responses_prefix() + _sse(
        "error",
        {
            "type": "error",
            "code": "ERR_SOMETHING",
            "message": "Something went wrong",
            "param": None,
            "sequence_number": 6,
        },
    )
    with pytest.raises(StreamError) as info:
        assemble("responses", body)
    assert info.value.upstream_error == {"code": "ERR_SOMETHING", "message": "Something went wrong", "param": None}


def test_responses_truncated() -> None:
    with pytest.raises(StreamError, match=r"stream ended before response\.completed"):
        assemble("responses", _responses_prefix())


# ------------------------------------------------------------------------------------------------
# messages (Anthropic)


def _ant(event: str, payload: str) -> bytes:
    return f"event: {event}\ndata: {payload}\n\n".encode()


MESSAGES_BODY = b"".join(
    [
        _ant(
            "message_start",
            '{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message",'
            '"role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,'
            '"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,'
            '"cache_read_input_tokens":0,"output_tokens":2}}}',
        ),
        _ant(
            "content_block_start",
            '{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}',
        ),
        _ant("ping", '{"type": "ping"}'),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta",'
            '"thinking":"The user wants the weather"}}',
        ),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta",'
            '"thinking":" in San Francisco."}}',
        ),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta",'
            '"signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}',
        ),
        _ant("content_block_stop", '{"type":"content_block_stop","index":0}'),
        _ant(
            "content_block_start",
            '{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}',
        ),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Okay, let\'s check"}}',
        ),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":" the weather."}}',
        ),
        _ant("content_block_stop", '{"type":"content_block_stop","index":1}'),
        _ant(
            "content_block_start",
            '{"type":"content_block_start","index":2,"content_block":{"type":"tool_use",'
            '"id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}',
        ),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}',
        ),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta",'
            '"partial_json":"{\\"location\\": \\"San Fra"}}',
        ),
        _ant(
            "content_block_delta",
            '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta",'
            '"partial_json":"ncisco, CA\\", \\"unit\\": \\"fahrenheit\\"}"}}',
        ),
        _ant("content_block_stop", '{"type":"content_block_stop","index":2}'),
        _ant(
            "message_delta",
            '{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
            '"usage":{"output_tokens":89}}',
        ),
        _ant("message_stop", '{"type":"message_stop"}'),
    ]
)

MESSAGES_RESULT = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {
            "type": "thinking",
            "thinking": "The user wants the weather in San Francisco.",
            "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds",
        },
        {"type": "text", "text": "Okay, let's check the weather."},
        {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA", "unit": "fahrenheit"},
        },
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 472,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 89,
    },
}


def test_messages_text_tool_use_thinking() -> None:
    result = assemble_all_ways("messages", MESSAGES_BODY)
    assert result == MESSAGES_RESULT
    Message.model_validate(result)


def test_messages_done_flag() -> None:
    assembler = assembler_for("messages")
    for event in SSEParser().feed(MESSAGES_BODY):
        assert not assembler.done
        assembler.add(event)
    assert assembler.done


def test_messages_tool_use_without_arguments_and_without_stop() -> None:
    # No partial_json at all keeps the start's input; only empty fragments parse to {}; a block never
    # stopped is still parsed at the end.
    start = MESSAGES_BODY.split(b"\n\n")[0] + b"\n\n"
    body = start + b"".join(
        [
            _ant(
                "content_block_start",
                '{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t0",'
                '"name":"now","input":{}}}',
            ),
            _ant("content_block_stop", '{"type":"content_block_stop","index":0}'),
            _ant(
                "content_block_start",
                '{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t1",'
                '"name":"now","input":{}}}',
            ),
            _ant(
                "content_block_delta",
                '{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}',
            ),
            _ant(
                "content_block_start",
                '{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"t2",'
                '"name":"f","input":{}}}',
            ),
            _ant(
                "content_block_delta",
                '{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta",'
                '"partial_json":"{\\"a\\": [1, 2]}"}}',
            ),
            _ant(
                "message_delta",
                '{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},'
                '"usage":{"input_tokens":null,"output_tokens":30}}',
            ),
            _ant("message_stop", '{"type":"message_stop"}'),
        ]
    )
    result = assemble_all_ways("messages", body)
    assert result["content"] == [
        {"type": "tool_use", "id": "t0", "name": "now", "input": {}},
        {"type": "tool_use", "id": "t1", "name": "now", "input": {}},
        {"type": "tool_use", "id": "t2", "name": "f", "input": {"a": [1, 2]}},
    ]
    # A null usage field in message_delta does not erase the value from message_start.
    assert result["usage"]["input_tokens"] == 472
    assert result["usage"]["output_tokens"] == 30


def test_messages_citations_delta() -> None:
    citation = (
        '{"type":"char_location","cited_text":"The sky is blue.","document_index":0,'
        '"document_title":"Facts","start_char_index":0,"end_char_index":16}'
    )
    start = MESSAGES_BODY.split(b"\n\n")[0] + b"\n\n"
    body = start + b"".join(
        [
            _ant(
                "content_block_start",
                '{"type":"content_block_start","index":0,"content_block":{"type":"text","text":"","citations":[]}}',
            ),
            _ant(
                "content_block_delta",
                f'{{"type":"content_block_delta","index":0,"delta":{{"type":"citations_delta",'
                f'"citation":{citation}}}}}',
            ),
            _ant(
                "content_block_delta",
                '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"It is blue."}}',
            ),
            _ant("content_block_stop", '{"type":"content_block_stop","index":0}'),
            _ant("message_delta", '{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{}}'),
            _ant("message_stop", '{"type":"message_stop"}'),
        ]
    )
    result = assemble("messages", body)
    assert result["content"] == [{"type": "text", "text": "It is blue.", "citations": [orjson.loads(citation)]}]
    assert result["stop_reason"] == "end_turn"
    Message.model_validate(result)


def test_messages_error_event() -> None:
    body = b"".join(MESSAGES_BODY.split(b"\n\n")[i] + b"\n\n" for i in range(4))
    body += _ant("error", '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}')
    with pytest.raises(StreamError) as info:
        assemble("messages", body)
    assert info.value.upstream_error == {"type": "overloaded_error", "message": "Overloaded"}
    assert "Overloaded" in str(info.value)


def test_messages_truncated() -> None:
    body = MESSAGES_BODY[: MESSAGES_BODY.index(b"event: message_stop")]
    with pytest.raises(StreamError, match="before message_stop"):
        assemble("messages", body)


def test_messages_invalid_tool_json() -> None:
    start = MESSAGES_BODY.split(b"\n\n")[0] + b"\n\n"
    body = start + b"".join(
        [
            _ant(
                "content_block_start",
                '{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t",'
                '"name":"f","input":{}}}',
            ),
            _ant(
                "content_block_delta",
                '{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta",'
                '"partial_json":"{\\"a\\": "}}',
            ),
            _ant("content_block_stop", '{"type":"content_block_stop","index":0}'),
        ]
    )
    with pytest.raises(StreamError, match="not valid JSON"):
        assemble("messages", body)


# ------------------------------------------------------------------------------------------------
# Garbage: anything wrong surfaces as StreamError, never TypeError/KeyError/AttributeError.

_MSG_START = '{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[]}}'

GARBAGE: list[tuple[Kind, list[str]]] = [
    ("chat", ["not json"]),
    ("chat", ["[1, 2]"]),
    ("chat", ['"a string"']),
    ("chat", ["null"]),
    ("chat", ['{"choices": "x"}']),
    ("chat", ['{"choices": [1]}']),
    ("chat", ['{"choices": [{"index": "0"}]}']),
    ("chat", ['{"choices": [{"index": true}]}']),
    ("chat", ['{"choices": [{"index": -1}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": []}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"content": 5}}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"role": ["assistant"]}}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"tool_calls": {}}}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"tool_calls": [7]}}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 1}}]}}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": 3}]}}]}']),
    ("chat", ['{"choices": [{"index": 0, "delta": {"function_call": "f"}}]}']),
    ("chat", ['{"choices": [{"index": 0, "logprobs": [1]}]}']),
    ("chat", ['{"choices": [], "usage": 3}']),
    ("chat", ['{"choices": [{"index": 18446744073709551616}]}']),
    ("completions", ['{"choices": [{"index": 0, "text": 1}]}']),
    ("completions", ['{"choices": [{"index": 0, "text": "a", "logprobs": "x"}]}']),
    ("completions", ['{"choices": {"0": {"text": "a"}}}']),
    ("responses", ["{"]),
    ("responses", ["[]"]),
    ("responses", ['{"type": "response.completed"}']),
    ("responses", ['{"type": "response.completed", "response": []}']),
    ("messages", ["nope"]),
    ("messages", ['{"type": "message_start", "message": "x"}']),
    ("messages", ['{"type": "message_start", "message": {"content": "x"}}']),
    ("messages", ['{"type": "message_start", "message": {"content": [1]}}']),
    ("messages", ['{"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}']),
    ("messages", [_MSG_START, '{"type": "content_block_start", "index": "0", "content_block": {}}']),
    ("messages", [_MSG_START, '{"type": "content_block_start", "index": 0, "content_block": "text"}']),
    ("messages", [_MSG_START, '{"type": "content_block_delta", "index": 5, "delta": {"type": "text_delta"}}']),
    (
        "messages",
        [
            _MSG_START,
            '{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}',
            '{"type": "content_block_delta", "index": 0, "delta": "x"}',
        ],
    ),
    (
        "messages",
        [
            _MSG_START,
            '{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}',
            '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 3}}',
        ],
    ),
    ("messages", [_MSG_START, '{"type": "message_delta", "delta": [], "usage": {}}']),
    ("messages", [_MSG_START, '{"type": "message_delta", "delta": {}, "usage": []}']),
]


@pytest.mark.parametrize(("kind", "events"), GARBAGE)
def test_garbage_raises_stream_error(kind: Kind, events: list[str]) -> None:
    assembler = assembler_for(kind)
    with pytest.raises(StreamError):
        for data in events:
            assembler.add(SSEEvent(None, data))
        assembler.result()


def test_garbage_text_in_block_start_surfaces_at_result() -> None:
    assembler = assembler_for("messages")
    for data in [
        _MSG_START,
        '{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": 5}}',
        '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}',
        '{"type": "message_stop"}',
    ]:
        assembler.add(SSEEvent(None, data))
    with pytest.raises(StreamError):
        assembler.result()


_KEYS = st.sampled_from(
    [
        "type", "index", "delta", "choices", "content", "tool_calls", "function", "arguments", "name", "id",
        "usage", "logprobs", "message", "content_block", "partial_json", "text", "response", "error",
        "finish_reason", "stop_reason", "role", "citation", "thinking", "signature", "object", "function_call",
        "citations", "input", "refusal", "reasoning_content",
    ]
)  # fmt: skip
_TYPES = st.sampled_from(
    [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop", "text_delta", "input_json_delta", "thinking_delta", "signature_delta",
        "citations_delta", "tool_use", "text", "error", "response.completed", "response.failed", "ping",
    ]
)  # fmt: skip
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | _TYPES | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(["chat", "completions", "responses", "messages"]),
    engine=st.sampled_from(get_args(Engine)),
    payloads=st.lists(_JSON, max_size=8),
)
def test_fuzz_only_stream_error(kind: Kind, engine: Engine, payloads: list[Any]) -> None:
    assembler = assembler_for(kind, engine)
    try:
        for payload in payloads:
            assembler.add(SSEEvent(None, orjson.dumps(payload).decode()))
        result = assembler.result()
    except StreamError:
        return
    assert isinstance(result, dict)


# ------------------------------------------------------------------------------------------------
# Real vLLM 0.32 captures (tests/data/vllm/*.txt): for one request, vLLM's direct non-streaming answer,
# then the stream it sent for the same request upgraded by `upgrade_request` (the tiny random Qwen2-VL,
# one 64x48 PNG, `temperature: 0` unless the options say otherwise; plain text, as captured). A file
# starts `### <kind> <options> ...`, the options added to the request; then `<status>`, the answer,
# `### stream`, `<status>`, the stream's bytes.

VLLM_DATA = Path(__file__).resolve().parent / "data" / "vllm"
_HEAD = re.compile(r"^### (\w+) (\{.*\})")


def vllm_capture(name: str) -> tuple[Kind, dict[str, Any], tuple[int, Any], tuple[int, bytes]]:
    """(kind, options, (status, direct answer), (status, stream bytes)) of one capture."""
    head, rest = (VLLM_DATA / f"{name}.txt").read_text(encoding="utf-8").split("\n", 1)
    match = _HEAD.match(head)
    assert match, head
    direct, stream = rest.split("\n### stream\n", 1)
    direct_status, direct_body = direct.split("\n", 1)
    stream_status, stream_body = stream.split("\n", 1)
    kind: Kind = match[1]  # type: ignore[assignment]
    answer = (int(direct_status), orjson.loads(direct_body))
    return kind, orjson.loads(match[2]), answer, (int(stream_status), stream_body.encode())


# Upgraded requests whose assembled answer must equal vLLM's own, byte for byte once normalised
# (same keys, same order, same values).
FAITHFUL = [
    "chat-plain",
    "chat-return_token_ids",
    "chat-logprobs",
    "chat-n2",
    "chat-stop",
    "messages-plain",
    "messages-stop_sequences",
    "messages-empty",
    "completions-return_token_ids-logprobs",
    "completions-n2",
    "responses-plain",
]


@pytest.mark.parametrize("name", FAITHFUL)
def test_vllm_capture_assembles_to_the_direct_answer(name: str) -> None:
    kind, options, (status, direct), (stream_status, stream) = vllm_capture(name)
    assert (status, stream_status) == (200, 200)
    assert can_upgrade(kind, options)
    assembled = assemble_all_ways(kind, stream, engine="vllm")
    assert orjson.dumps(normalised(assembled)) == orjson.dumps(normalised(direct))


def test_vllm_capture_return_token_ids_carried() -> None:
    """The stream's top-level prompt_token_ids (first chunk) and per-chunk choice token_ids survive."""
    _, _, (_, direct), (_, stream) = vllm_capture("chat-return_token_ids")
    for engine in get_args(Engine):
        assembled = assemble("chat", stream, engine=engine)
        assert assembled["prompt_token_ids"] == direct["prompt_token_ids"] and len(direct["prompt_token_ids"]) > 10
        assert assembled["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
        assert len(direct["choices"][0]["token_ids"]) == 3


def test_vllm_capture_n2_prompt_token_ids_not_doubled() -> None:
    """vLLM repeats top-level prompt_token_ids in each choice's first chunk: last wins, never extended."""
    _, _, (_, direct), (_, stream) = vllm_capture("chat-n2")
    assert stream.count(b'"prompt_token_ids":[') == 2
    assembled = assemble("chat", stream)
    assert assembled["prompt_token_ids"] == direct["prompt_token_ids"]
    assert [c["token_ids"] for c in assembled["choices"]] == [c["token_ids"] for c in direct["choices"]]


def _same_but_absent_nulls(generic: Any, direct: Any, path: str = "") -> None:
    """`generic` equals `direct` except that a key either side holds as null may be absent from the other."""
    if isinstance(generic, dict) and isinstance(direct, dict):
        for key in generic.keys() | direct.keys():
            where = f"{path}.{key}"
            if key in generic and key in direct:
                _same_but_absent_nulls(generic[key], direct[key], where)
            else:
                assert (generic if key in generic else direct)[key] is None, where
    elif isinstance(generic, list) and isinstance(direct, list):
        assert len(generic) == len(direct), path
        for i, (g, d) in enumerate(zip(generic, direct, strict=True)):
            _same_but_absent_nulls(g, d, f"{path}[{i}]")
    else:
        assert generic == direct, path


@pytest.mark.parametrize("name", [n for n in FAITHFUL if n != "messages-empty"])
def test_vllm_capture_generic_is_what_the_stream_carried(name: str) -> None:
    """engine: generic differs from vLLM's answer only by null keys: the stream's `stop_sequence: null`
    kept, the answer's null keys that the stream left out absent."""
    kind, _, (_, direct), (_, stream) = vllm_capture(name)
    _same_but_absent_nulls(normalised(assemble(kind, stream)), normalised(direct))


def test_vllm_capture_generic_and_vllm_differ_on_known_null_keys() -> None:
    _, _, (_, direct), (_, stream) = vllm_capture("chat-plain")
    generic, shaped = assemble("chat", stream), assemble("chat", stream, engine="vllm")
    assert "kv_transfer_params" not in generic and shaped["kv_transfer_params"] is None
    assert "prompt_tokens_details" not in generic["usage"] and shaped["usage"]["prompt_tokens_details"] is None
    assert "refusal" not in generic["choices"][0]["message"] and shaped["choices"][0]["message"]["refusal"] is None
    assert list(shaped) == list(direct)
    _, _, (_, direct), (_, stream) = vllm_capture("messages-empty")
    generic, shaped = assemble("messages", stream), assemble("messages", stream, engine="vllm")
    assert generic["stop_sequence"] is None and "stop_sequence" not in shaped and "stop_sequence" not in direct
    assert generic["content"] == [] and shaped["content"] == direct["content"] == [{"type": "text", "text": ""}]


@pytest.mark.parametrize("name", ["chat-prompt_logprobs", "completions-prompt_logprobs", "chat-echo"])
def test_vllm_capture_of_what_is_not_upgraded(name: str) -> None:
    """Each is a request `can_upgrade` keeps non-streaming, and the capture shows why: vLLM refuses the
    stream, or the stream lacks what the direct answer has (echo's prompt logprobs)."""
    kind, options, (status, direct), (stream_status, stream) = vllm_capture(name)
    assert status == 200
    assert not can_upgrade(kind, options)
    if stream_status == 200:
        assembled = assemble(kind, stream, engine="vllm")
        assert direct["prompt_logprobs"] and assembled["prompt_logprobs"] is None
    else:
        assert stream_status == 400 and orjson.loads(stream)["error"]["param"] == "prompt_logprobs"


_ALL_KINDS: list[Kind] = ["chat", "completions", "responses", "messages"]
_NOT_RESPONSES: list[Kind] = ["chat", "completions", "messages"]
REFUSED: list[tuple[Kind, dict[str, Any], str]] = [
    *((k, {"prompt_logprobs": 0}, "prompt_logprobs") for k in ("chat", "completions")),
    *((k, {"prompt_logprobs": 2}, "prompt_logprobs") for k in ("chat", "completions")),
    *((k, {"echo": True}, "echo") for k in ("chat", "completions")),
    *((k, {"stream_options": {"include_usage": True}}, "stream_options") for k in ("chat", "completions")),
    *((k, {"use_beam_search": True}, "use_beam_search") for k in ("chat", "completions")),
    *((k, {"kv_transfer_params": {"do_remote_decode": True}}, "kv_transfer_params") for k in _NOT_RESPONSES),
    *((k, {"kv_transfer_params": {}}, "kv_transfer_params") for k in _NOT_RESPONSES),
    *((k, {"ec_transfer_params": {"do_remote_encode": True}}, "ec_transfer_params") for k in _NOT_RESPONSES),
    ("responses", {"background": True, "store": True}, "background"),
    ("responses", {"include": ["message.output_text.logprobs"], "top_logprobs": 2}, "logprobs"),
    *((k, {"stream": True}, "stream") for k in _ALL_KINDS),
]


@pytest.mark.parametrize(("kind", "options", "named"), REFUSED)
def test_can_upgrade_refuses_what_the_stream_cannot_express(kind: Kind, options: dict[str, Any], named: str) -> None:
    body = {"model": "m", **options}
    assert not can_upgrade(kind, body)
    reason = upgrade_refusal(kind, body)
    assert reason is not None and named in reason


KEPT: list[tuple[Kind, dict[str, Any]]] = [
    ("chat", {"return_token_ids": True}),
    ("chat", {"logprobs": True, "top_logprobs": 2}),
    ("chat", {"n": 2, "seed": 7, "temperature": 1}),
    ("chat", {"stop": ["is"], "max_tokens": 4}),
    ("chat", {"return_prompt_text": True}),
    ("chat", {"echo": False, "prompt_logprobs": None, "kv_transfer_params": None, "use_beam_search": False}),
    ("chat", {"stream_options": {}}),  # vLLM accepts an empty one without a stream (it tests truthiness)
    ("chat", {"stream_options": None}),
    ("completions", {"return_token_ids": True, "logprobs": 2}),
    ("responses", {"top_logprobs": 2}),  # without include, no logprobs are returned either way
    ("responses", {"include": ["reasoning.encrypted_content"], "background": False}),
    # The terminal response.completed event carries the engine's transfer parameters.
    ("responses", {"kv_transfer_params": {"do_remote_decode": True}, "ec_transfer_params": {}}),
    ("messages", {"stop_sequences": ["is"]}),
    ("messages", {"echo": True, "prompt_logprobs": 1}),  # not Anthropic fields: the engine ignores them
]


@pytest.mark.parametrize(("kind", "options"), KEPT)
def test_can_upgrade_keeps_what_the_stream_expresses(kind: Kind, options: dict[str, Any]) -> None:
    body = {"model": "m", **options}
    assert can_upgrade(kind, body) and upgrade_refusal(kind, body) is None


def test_unknown_fields_carried_through() -> None:
    """Top-level: last non-null wins (never extended); choice-level: lists extend, others last non-null
    wins, a null keeps the key without erasing; only keys the stream had appear (generic)."""
    chunks = [
        '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","top_list":[1],"top":"a","top_null":null,'
        '"choices":[{"index":0,"delta":{"role":"assistant","content":"x"},"ids":[1,2],"tag":"t1","gone":null}]}',
        '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","top_list":[1],"top":null,'
        '"choices":[{"index":0,"delta":{"content":"y"},"ids":[3],"tag":null,"finish_reason":"stop"}]}',
        '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"metrics":{"ttft":0.1},'
        '"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
    ]
    body = b"".join(f"data: {c}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
    result = assemble_all_ways("chat", body)
    assert result["top_list"] == [1] and result["top"] == "a" and result["top_null"] is None
    assert result["metrics"] == {"ttft": 0.1}
    choice = result["choices"][0]
    assert choice["ids"] == [1, 2, 3] and choice["tag"] == "t1" and "gone" in choice and choice["gone"] is None
    assert choice["message"] == {"role": "assistant", "content": "xy"}
    assert "token_ids" not in choice and "prompt_token_ids" not in result
    text = body.replace(b'"delta":{"role":"assistant","content":"x"}', b'"text":"x"')
    text = text.replace(b'"delta":{"content":"y"}', b'"text":"y"').replace(b"chat.completion.chunk", b"text_completion")
    completion = assemble_all_ways("completions", text)
    assert completion["choices"][0]["ids"] == [1, 2, 3] and completion["choices"][0]["text"] == "xy"
    assert completion["top"] == "a" and completion["metrics"] == {"ttft": 0.1}


def test_vllm_shape_keeps_fields_it_does_not_know() -> None:
    body = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","novel":7,'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":"x","novel_delta":"d"},"novel_choice":[1],'
        b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    result = assemble("chat", body, engine="vllm")
    assert result["novel"] == 7 and list(result)[-1] == "novel"
    assert result["choices"][0]["novel_choice"] == [1] and result["choices"][0]["message"]["novel_delta"] == "d"
    assert result["usage"] is None and result["choices"][0]["token_ids"] is None
