"""Non-streaming answers: a ``chat.completion`` as an Anthropic Message or a Responses ``response`` object."""

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
