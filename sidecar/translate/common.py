"""The mapping of chat answer fields shared by whole answers (:mod:`.answers`) and streams (:mod:`.streams`).

Ids in the client API's style, usage, stop reasons, the Responses ``response`` object and its output items;
plus the lenient readers of the engine's output both sides use.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

JSON = dict[str, Any]


def _with_prefix(prefix: str, ident: Any) -> str:
    """An id in the client API's style, derived from the engine's so that logs can be correlated."""
    if not isinstance(ident, str) or not ident:
        return prefix + uuid.uuid4().hex
    if ident.startswith(prefix):
        return ident
    return prefix + ident.removeprefix("chatcmpl-")


def _dict(value: Any) -> JSON:
    """Lenient reading of the engine's output: a field of the wrong type counts as absent."""
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _cached_tokens(usage: JSON) -> int:
    details = usage.get("prompt_tokens_details")
    return _int(details.get("cached_tokens")) if isinstance(details, dict) else 0


def _anthropic_usage(usage: Any, *, delta: bool = False) -> JSON:
    usage = usage if isinstance(usage, dict) else {}
    cached = _cached_tokens(usage)
    # Anthropic counts cache reads apart from input_tokens; chat's prompt_tokens includes them.
    out: JSON = {"input_tokens": max(_int(usage.get("prompt_tokens")) - cached, 0)}
    if cached:
        out["cache_read_input_tokens"] = cached
    out["output_tokens"] = _int(usage.get("completion_tokens"))
    if delta and not usage:
        del out["input_tokens"]  # unknown: keep message_start's value rather than overwrite it with 0
    return out


def _anthropic_stop(finish_reason: Any, matched_stop: Any) -> tuple[str, str | None]:
    if finish_reason == "stop" and isinstance(matched_stop, str):
        # vLLM reports the stop string that ended generation in the choice's stop_reason.
        return "stop_sequence", matched_stop
    mapped = {
        "length": "max_tokens",
        "tool_calls": "tool_use",
        "function_call": "tool_use",
        "content_filter": "refusal",
    }
    return mapped.get(finish_reason, "end_turn"), None


def _responses_usage(usage: Any) -> JSON | None:
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    details = usage.get("completion_tokens_details")
    reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": _cached_tokens(usage), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": _int(usage.get("total_tokens")) or prompt + completion,
    }


ResponseStatus = Literal["completed", "incomplete"]


def _responses_status(finish_reason: Any) -> tuple[ResponseStatus, JSON | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _response_object(
    request: JSON,
    *,
    response_id: str,
    created_at: int,
    model: Any,
    status: str,
    incomplete_details: JSON | None,
    output: list[JSON],
    usage: JSON | None,
) -> JSON:
    """The Responses ``response`` object, echoing request settings the way the API does."""

    def echo(name: str, default: Any) -> Any:
        value = request.get(name)
        return default if value is None else value

    reasoning = request.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": incomplete_details,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model") or model or "",
        "output": output,
        "parallel_tool_calls": echo("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": effort, "summary": None},
        # Nothing is stored: a later previous_response_id pointing at this response would be refused.
        "store": False,
        "temperature": echo("temperature", 1.0),
        "text": echo("text", {"format": {"type": "text"}}),
        "tool_choice": echo("tool_choice", "auto"),
        "tools": echo("tools", []),
        "top_p": echo("top_p", 1.0),
        "truncation": echo("truncation", "disabled"),
        "usage": usage,
        "user": request.get("user"),
        "metadata": echo("metadata", {}),
    }


def _message_item(item_id: str, text: str, status: str) -> JSON:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}


def _function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> JSON:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }
