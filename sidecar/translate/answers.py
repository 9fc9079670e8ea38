"""Non-streaming answers: a ``chat.completion`` as an Anthropic Message or a Responses ``response`` object,
and an engine's error answer in the client API's error shape."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from .common import (
    JSON,
    _anthropic_stop,
    _anthropic_usage,
    _dict,
    _function_call_item,
    _message_item,
    _response_object,
    _responses_status,
    _responses_usage,
    _with_prefix,
)


def _tool_input(arguments: Any) -> JSON:
    """Anthropic tool input is an object; a model that wrote something else keeps it visible as _raw."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw": arguments}


def _first_choice(chat_response: JSON) -> JSON:
    choices = chat_response.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            # The translated request never asks for n > 1, so choice 0 is the answer.
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                return choice
    return {}


def _tool_calls(message: JSON) -> list[JSON]:
    calls = message.get("tool_calls")
    out: list[JSON] = []
    for call in calls if isinstance(calls, list) else []:
        if isinstance(call, dict):
            function = _dict(call.get("function"))
            out.append(
                {"id": call.get("id"), "name": function.get("name") or "", "arguments": function.get("arguments")}
            )
    return out


def chat_to_messages(chat_response: JSON) -> JSON:
    """A ``chat.completion`` as an Anthropic Message."""
    choice = _first_choice(chat_response)
    message = _dict(choice.get("message"))
    content: list[JSON] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in _tool_calls(message):
        content.append(
            {
                "type": "tool_use",
                "id": call["id"] or "toolu_" + uuid.uuid4().hex,
                "name": call["name"],
                "input": _tool_input(call["arguments"]),
            }
        )
    stop_reason, stop_sequence = _anthropic_stop(choice.get("finish_reason"), choice.get("stop_reason"))
    return {
        "id": _with_prefix("msg_", chat_response.get("id")),
        "type": "message",
        "role": "assistant",
        "model": chat_response.get("model") or "",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _anthropic_usage(chat_response.get("usage")),
    }


def chat_to_responses(chat_response: JSON, request: JSON) -> JSON:
    """A ``chat.completion`` as the Responses ``response`` object answering ``request``."""
    response_id = _with_prefix("resp_", chat_response.get("id"))
    base = response_id.removeprefix("resp_")
    choice = _first_choice(chat_response)
    message = _dict(choice.get("message"))
    status, incomplete = _responses_status(choice.get("finish_reason"))
    item_status = "incomplete" if status == "incomplete" else "completed"
    output: list[JSON] = []
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    calls = _tool_calls(message)
    if text or not calls:
        # The API always answers with a message unless the model only called tools.
        output.append(_message_item(f"msg_{base}_{len(output)}", text, item_status))
    for call in calls:
        arguments = call["arguments"] if isinstance(call["arguments"], str) else ""
        call_id = call["id"] or "call_" + uuid.uuid4().hex
        output.append(_function_call_item(f"fc_{base}_{len(output)}", call_id, call["name"], arguments, "completed"))
    created = chat_response.get("created")
    return _response_object(
        request,
        response_id=response_id,
        created_at=created if isinstance(created, int) else int(time.time()),
        model=chat_response.get("model"),
        status=status,
        incomplete_details=incomplete,
        output=output,
        usage=_responses_usage(chat_response.get("usage")),
    )


# ---- errors

# Anthropic's documented error types by HTTP status; 503 is what an overloaded engine answers.
ANTHROPIC_ERRORS_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    """The Anthropic error type for an HTTP error status; an unlisted one by its class."""
    return ANTHROPIC_ERRORS_BY_STATUS.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def engine_error(payload: Any) -> JSON:
    """The error object of an engine's error answer or in-band error event, whatever its wrapping:
    ``{"error": {...}}`` (OpenAI, vLLM), a flat ``{"object": "error", "message": ...}`` (older vLLM,
    SGLang), ``{"error": "text"}``, or not JSON at all."""
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            return inner
        if inner is not None:
            return {"message": str(inner)}
        return payload
    return {"message": str(payload)}


def _error_message(error: JSON, status: int) -> str:
    message = error.get("message")
    if isinstance(message, str) and message.strip():
        return message
    return f"the engine answered HTTP {status}"


def chat_error_to_messages(status: int, payload: Any) -> JSON:
    """An engine's error answer (``payload``: its parsed JSON, or its text) as an Anthropic error.

    The type follows the HTTP status, which the client sees too: the engine's own ``type`` is an
    OpenAI or Python class name (``invalid_request_error`` for a 404, ``BadRequestError``).
    """
    error = engine_error(payload)
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": _error_message(error, status)}}


def chat_error_to_responses(status: int, payload: Any) -> JSON:
    """An engine's error answer as the OpenAI error object the Responses API answers with.

    The engine's ``type`` and ``param`` are kept; ``code`` only when it is a string, as OpenAI's is
    (vLLM puts the HTTP status there, which the client has as the status itself).
    """
    error = engine_error(payload)
    kind = error.get("type")
    if not isinstance(kind, str) or not kind:
        kind = "invalid_request_error" if status < 500 else "server_error"
    param, code = error.get("param"), error.get("code")
    return {
        "error": {
            "message": _error_message(error, status),
            "type": kind,
            "param": param if isinstance(param, str) else None,
            "code": code if isinstance(code, str) else None,
        }
    }
