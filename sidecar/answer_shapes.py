"""The engine's own non-streaming answer shape, given to an answer re-assembled from its stream.

An upgraded request (`upstream.stream_upgrade`) is answered from the stream the engine sent, and a
stream does not spell everything as the engine's non-streaming answer does: vLLM's chunks leave out
the keys whose value is null (`exclude_unset`), its final usage chunk drops null usage details
(`exclude_none`), its Anthropic non-streaming answer drops every null (`exclude_none`) where the
stream's `message_start` spells `stop_sequence: null`. `upstream.engine` names the shape to restore:

* ``generic``: the assembled answer as it is: every field the stream carried and nothing more, so a
  key the engine would have set to null in its non-streaming answer may be absent;
* ``vllm``: vLLM 0.32's non-streaming keys, in its order, null where the stream gave nothing, and
  without the keys its non-streaming answer never has; fields this table does not know are kept
  after the known ones (a newer vLLM's additions go through).

Values are never changed, only keys added (as null), dropped (when null) or reordered.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["Engine", "shape_answer"]

Engine = Literal["generic", "vllm"]

# vLLM 0.32 pydantic models, fields in declaration order (the order its JSON answers use):
# entrypoints/openai/chat_completion/protocol.py, completion/protocol.py, serve/engine/protocol.py.
_CHAT_RESPONSE = (
    "id",
    "object",
    "created",
    "model",
    "choices",
    "service_tier",
    "system_fingerprint",
    "usage",
    "prompt_logprobs",
    "prompt_token_ids",
    "prompt_text",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
)
_CHAT_CHOICE = ("index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts")
# ChatMessage: `tool_calls` is serialized only when non-empty (its model_serializer pops an empty list).
_CHAT_MESSAGE = ("role", "content", "refusal", "annotations", "audio", "function_call", "tool_calls", "reasoning")
_CHAT_MESSAGE_OPTIONAL = frozenset(("tool_calls",))
_COMPLETION_RESPONSE = (
    "id",
    "object",
    "created",
    "model",
    "choices",
    "service_tier",
    "system_fingerprint",
    "usage",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
)
_COMPLETION_CHOICE = (
    "index",
    "text",
    "logprobs",
    "finish_reason",
    "stop_reason",
    "token_ids",
    "prompt_logprobs",
    "prompt_token_ids",
    "routed_experts",
)
_USAGE = ("prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
# entrypoints/anthropic/protocol.py; the answer is `model_dump(exclude_none=True)` (anthropic/api_router.py).
_MESSAGES_RESPONSE = (
    "id",
    "type",
    "role",
    "content",
    "model",
    "stop_reason",
    "stop_sequence",
    "usage",
    "kv_transfer_params",
    "ec_transfer_params",
)
_MESSAGES_BLOCK = (
    "type",
    "text",
    "source",
    "id",
    "tool_use_id",
    "name",
    "input",
    "content",
    "is_error",
    "tool_name",
    "thinking",
    "signature",
    "data",
    "tool",
)
_MESSAGES_USAGE = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _ordered(obj: dict[str, Any], keys: tuple[str, ...], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`obj` with every key of `keys` first, in that order (null where absent, unless optional),
    then its other keys as they were."""
    out: dict[str, Any] = {}
    for key in keys:
        if key in obj:
            out[key] = obj[key]
        elif key not in optional:
            out[key] = None
    for key, value in obj.items():
        if key not in out:
            out[key] = value
    return out


def _without_nulls(obj: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`obj` minus its null values, known keys first in `keys`' order (pydantic's exclude_none)."""
    known = {key: obj[key] for key in keys if obj.get(key) is not None}
    return known | {k: v for k, v in obj.items() if k not in known and v is not None}


def _vllm_usage(usage: Any) -> Any:
    return _ordered(usage, _USAGE) if isinstance(usage, dict) else usage


def _vllm_chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    out = _ordered(choice, _CHAT_CHOICE)
    message = out.get("message")
    if isinstance(message, dict):
        out["message"] = _ordered(message, _CHAT_MESSAGE, _CHAT_MESSAGE_OPTIONAL)
    return out


def _vllm_chat(answer: dict[str, Any]) -> dict[str, Any]:
    out = _ordered(answer, _CHAT_RESPONSE)
    choices = out.get("choices")
    if isinstance(choices, list):
        out["choices"] = [_vllm_chat_choice(c) if isinstance(c, dict) else c for c in choices]
    out["usage"] = _vllm_usage(out["usage"])
    return out


def _vllm_completions(answer: dict[str, Any]) -> dict[str, Any]:
    out = _ordered(answer, _COMPLETION_RESPONSE)
    choices = out.get("choices")
    if isinstance(choices, list):
        out["choices"] = [_ordered(c, _COMPLETION_CHOICE) if isinstance(c, dict) else c for c in choices]
    out["usage"] = _vllm_usage(out["usage"])
    return out


def _vllm_messages(answer: dict[str, Any]) -> dict[str, Any]:
    out = _without_nulls(answer, _MESSAGES_RESPONSE)
    content = out.get("content")
    if isinstance(content, list):
        blocks = [_without_nulls(b, _MESSAGES_BLOCK) if isinstance(b, dict) else b for b in content]
        # vLLM's non-streaming answer for an empty completion is one empty text block, not [] (its
        # messages_full_converter); its stream starts no block for it.
        out["content"] = blocks or [{"type": "text", "text": ""}]
    usage = out.get("usage")
    if isinstance(usage, dict):
        out["usage"] = _without_nulls(usage, _MESSAGES_USAGE)
    return out


def shape_answer(kind: str, engine: Engine, answer: dict[str, Any]) -> dict[str, Any]:
    """The assembled `answer` of API `kind` in `engine`'s non-streaming shape: `answer` itself for
    generic, else a new dict (values other than the reshaped objects shared with `answer`)."""
    if engine == "generic":
        return answer
    if kind == "chat":
        return _vllm_chat(answer)
    if kind == "completions":
        return _vllm_completions(answer)
    if kind == "messages":
        return _vllm_messages(answer)
    # Responses: the terminal event carries the engine's own response object, already in its shape.
    return answer
