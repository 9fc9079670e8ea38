"""Translation between the client-facing APIs and the chat completions API the offload engine speaks.

In offload mode the upstream is the reference engine, which only implements ``/v1/chat/completions``.
Clients may still call ``/v1/messages`` (Anthropic) or ``/v1/responses`` (OpenAI Responses); this module
owns the payload-level mapping both ways, and nothing else (no I/O, no HTTP statuses):

* requests: :func:`messages_to_chat` and :func:`responses_to_chat` build a chat request, raising
  :class:`TranslationError` (naming the field) for anything chat cannot express;
* non-streaming answers: :func:`chat_to_messages` and :func:`chat_to_responses` turn a ``chat.completion``
  (as :func:`sidecar.assemble.assembler_for` re-assembles it) into the client API's object;
* streams: :func:`chat_stream_to_messages` and :func:`chat_stream_to_responses` return a
  :class:`StreamTranslator` fed the engine's parsed chat SSE events one by one; it answers with encoded
  SSE frames in the client API's own event grammar.

Policy for request fields. Each API's fields fall in four groups: translated; dropped because they only
tune things the engine does not have (thinking budgets, service tiers, cache hints, storage); refused
with :class:`TranslationError` because dropping them would silently change the answer (server-side
tools, stored conversation state); and unknown fields, which pass through unchanged so that engine
extensions sent with the SDKs' ``extra_body`` (``repetition_penalty``, ``min_p``...) still reach it.

Streams never raise on what the engine sends: an in-band error, malformed JSON or a truncated stream
becomes the client API's ``error`` event, after which the translator is closed.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from sidecar.sse import SSEEvent

__all__ = [
    "StreamTranslator",
    "TranslationError",
    "chat_stream_to_messages",
    "chat_stream_to_responses",
    "chat_to_messages",
    "chat_to_responses",
    "messages_to_chat",
    "responses_to_chat",
]

JSON = dict[str, Any]

# Content parts that are already in chat form. They pass through untouched: in offload mode the sidecar
# has rewritten images into opaque `image_tensors` parts before translation, and the rest are chat (or
# vLLM) multimodal parts a client may send to an engine that understands them.
_CHAT_PARTS = frozenset(("image_tensors", "image_url", "input_audio", "audio_url", "video_url", "image_embeds", "file"))


class TranslationError(ValueError):
    """A request field cannot be expressed as chat completions. The message starts with the field's path."""


def _untranslatable(path: str, value: Any) -> TranslationError:
    return TranslationError(f"{path}: {value!r} cannot be translated to chat completions")


def _need_obj(value: Any, path: str) -> JSON:
    if not isinstance(value, dict):
        raise TranslationError(f"{path}: expected an object, got {type(value).__name__}")
    return value


def _need_list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise TranslationError(f"{path}: expected an array, got {type(value).__name__}")
    return value


def _need_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise TranslationError(f"{path}: expected a string, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------
# Requests


class _ChatMessages:
    """The chat message list being built, with the one re-ordering chat forces on us.

    Chat tool messages carry text only, so images returned by a tool travel in a user message; and that
    user message has to wait until the run of tool messages ends, because chat wants every tool answer
    right after the assistant turn that called it. Held-back images are merged into the next user
    message (Anthropic puts a turn's own text after its tool results) or become one of their own.
    """

    def __init__(self) -> None:
        self.messages: list[JSON] = []
        self._held: list[JSON] = []

    def add(self, message: JSON) -> None:
        if self._held:
            if message["role"] == "user":
                content = message["content"]
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                message = {**message, "content": [*self._held, *parts]}
            else:
                self.messages.append({"role": "user", "content": self._held})
            self._held = []
        self.messages.append(message)

    def tool(self, call_id: str, text: str, images: list[JSON]) -> None:
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        self._held.extend(images)

    def tool_call(self, call: JSON) -> None:
        last = self.messages[-1] if self.messages and not self._held else None
        if last is not None and last["role"] == "assistant":
            # A Responses turn is a message item followed by its function_call items: one chat message.
            last.setdefault("tool_calls", []).append(call)
        else:
            self.add({"role": "assistant", "content": None, "tool_calls": [call]})

    def finish(self) -> list[JSON]:
        if self._held:
            self.messages.append({"role": "user", "content": self._held})
            self._held = []
        return self.messages


def _stream_fields(out: JSON, stream: Any) -> None:
    if stream is None:
        return
    out["stream"] = stream
    if stream:
        # Chat streams only report usage when asked, and both client APIs end their streams with usage.
        out["stream_options"] = {"include_usage": True}


def _prefill(out: JSON, messages: list[JSON]) -> None:
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
        # Both client APIs continue a trailing assistant message (prefill); chat would open a new turn
        # after it. These are vLLM's flags for continuing it, ignored by engines that lack the feature.
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False


# ---- Anthropic Messages -> chat

# fmt: off
_MESSAGES_HANDLED = frozenset(
    (
        "model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream",
        "tools", "tool_choice", "metadata", "output_config",
    )
)
# Knobs of Anthropic's own serving with no effect on what the engine can generate.
_MESSAGES_DROPPED = frozenset(
    (
        "thinking", "service_tier", "cache_control", "inference_geo", "speed", "diagnostics", "user_profile_id",
        "workspace_id",
    )
)
# fmt: on
# Server-side features: dropping them would change the answer without telling the client.
_MESSAGES_REFUSED = frozenset(("container", "mcp_servers", "context_management"))


def messages_to_chat(body: JSON) -> JSON:
    """An Anthropic Messages request as a chat completions request. ``body`` is not mutated."""
    out: JSON = {}
    chat = _ChatMessages()
    for key, value in body.items():
        if key in _MESSAGES_REFUSED and value is not None:
            raise TranslationError(f"{key}: cannot be translated to chat completions")
        if key not in _MESSAGES_HANDLED and key not in _MESSAGES_DROPPED and key not in _MESSAGES_REFUSED:
            out[key] = value
    if "model" in body:
        out["model"] = body["model"]
    system = body.get("system")
    if system is not None:
        chat.add({"role": "system", "content": _anthropic_system(system)})
    for i, message in enumerate(_need_list(body.get("messages"), "messages")):
        _anthropic_message(chat, _need_obj(message, f"messages[{i}]"), f"messages[{i}]")
    messages = chat.finish()
    out["messages"] = messages
    _prefill(out, messages)
    for src, dst in (("max_tokens", "max_tokens"), ("stop_sequences", "stop"), ("temperature", "temperature")):
        if body.get(src) is not None:
            out[dst] = body[src]
    for name in ("top_p", "top_k"):  # top_k is not in the OpenAI API; vLLM and SGLang accept it
        if body.get(name) is not None:
            out[name] = body[name]
    _stream_fields(out, body.get("stream"))
    if body.get("tools") is not None:
        out["tools"] = [
            _anthropic_tool(tool, f"tools[{k}]") for k, tool in enumerate(_need_list(body["tools"], "tools"))
        ]
    if body.get("tool_choice") is not None:
        _anthropic_tool_choice(out, _need_obj(body["tool_choice"], "tool_choice"))
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id") is not None:
        out["user"] = metadata["user_id"]
    output_config = body.get("output_config")
    if output_config is not None:
        # `effort` is a thinking budget (dropped like `thinking`); `format` is structured output.
        fmt = _need_obj(output_config, "output_config").get("format")
        if fmt is not None:
            fmt = _need_obj(fmt, "output_config.format")
            if fmt.get("type") != "json_schema":
                raise _untranslatable("output_config.format.type", fmt.get("type"))
            schema = fmt.get("schema")
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return out


def _anthropic_system(system: Any) -> str:
    if isinstance(system, str):
        return system
    texts: list[str] = []
    for i, raw in enumerate(_need_list(system, "system")):
        block = _need_obj(raw, f"system[{i}]")
        if block.get("type") != "text":
            raise _untranslatable(f"system[{i}].type", block.get("type"))
        texts.append(_need_str(block.get("text"), f"system[{i}].text"))
    # Chat templates commonly expect a string system prompt; the blocks are paragraphs of one prompt.
    return "\n\n".join(texts)


def _anthropic_image(block: JSON, path: str) -> JSON:
    source = _need_obj(block.get("source"), f"{path}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type = _need_str(source.get("media_type"), f"{path}.source.media_type")
        data = _need_str(source.get("data"), f"{path}.source.data")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        url = _need_str(source.get("url"), f"{path}.source.url")
    else:
        raise _untranslatable(f"{path}.source.type", kind)
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_part(block: JSON, path: str) -> JSON:
    """A user content block (or one inside a tool_result) as a chat content part."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": _need_str(block.get("text"), f"{path}.text")}
    if kind == "image":
        return _anthropic_image(block, path)
    if kind in _CHAT_PARTS:
        return block
    raise _untranslatable(f"{path}.type", kind)


def _anthropic_message(chat: _ChatMessages, message: JSON, path: str) -> None:
    role = message.get("role")
    content = message.get("content")
    if role not in ("user", "assistant"):
        raise _untranslatable(f"{path}.role", role)
    if isinstance(content, str):
        chat.add({"role": role, "content": content})
        return
    blocks = [_need_obj(b, f"{path}.content[{j}]") for j, b in enumerate(_need_list(content, f"{path}.content"))]
    if role == "assistant":
        chat.add(_anthropic_assistant(blocks, path))
        return
    parts: list[JSON] = []
    for j, block in enumerate(blocks):
        block_path = f"{path}.content[{j}]"
        if block.get("type") == "tool_result":
            text, images = _anthropic_tool_result(block.get("content"), f"{block_path}.content")
            chat.tool(_need_str(block.get("tool_use_id"), f"{block_path}.tool_use_id"), text, images)
        else:
            parts.append(_anthropic_part(block, block_path))
    if parts or not any(b.get("type") == "tool_result" for b in blocks):
        chat.add({"role": "user", "content": parts})


def _anthropic_tool_result(content: Any, path: str) -> tuple[str, list[JSON]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[JSON] = []
    for k, block in enumerate(_need_list(content, path)):
        part = _anthropic_part(_need_obj(block, f"{path}[{k}]"), f"{path}[{k}]")
        if part["type"] == "text":
            texts.append(part["text"])
        else:
            images.append(part)
    return "\n".join(texts), images


def _anthropic_assistant(blocks: list[JSON], path: str) -> JSON:
    texts: list[str] = []
    calls: list[JSON] = []
    for j, block in enumerate(blocks):
        block_path = f"{path}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_need_str(block.get("text"), f"{block_path}.text"))
        elif kind == "tool_use":
            arguments = _tool_arguments(block.get("input"))
            name = _need_str(block.get("name"), f"{block_path}.name")
            call_id = _need_str(block.get("id"), f"{block_path}.id")
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier reasoning is Anthropic-signed state a chat template has no slot for
        else:
            raise _untranslatable(f"{block_path}.type", kind)
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_arguments(tool_input: Any) -> str:
    if isinstance(tool_input, dict) and tool_input.keys() == {"_raw"} and isinstance(tool_input["_raw"], str):
        return str(tool_input["_raw"])  # what chat_to_messages kept of arguments that were not a JSON object
    return orjson.dumps(tool_input or {}).decode()


def _anthropic_tool(tool: Any, path: str) -> JSON:
    tool = _need_obj(tool, path)
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise _untranslatable(f"{path}.type", kind)
    function: JSON = {"name": _need_str(tool.get("name"), f"{path}.name")}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _anthropic_tool_choice(out: JSON, choice: JSON) -> None:
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        name = _need_str(choice.get("name"), "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise _untranslatable("tool_choice.type", kind)
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False


# ---- OpenAI Responses -> chat

# fmt: off
_RESPONSES_HANDLED = frozenset(
    (
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools", "tool_choice",
        "parallel_tool_calls", "text", "reasoning", "user", "safety_identifier", "top_logprobs",
    )
)
# Storage, caching and routing knobs of OpenAI's service; the response echoes what it needs of them.
_RESPONSES_DROPPED = frozenset(
    (
        "store", "metadata", "include", "truncation", "service_tier", "stream_options", "max_tool_calls",
        "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
    )
)
# fmt: on
# State kept by OpenAI between requests: the engine has none, so these cannot be honoured.
_RESPONSES_STATEFUL = ("previous_response_id", "conversation", "prompt", "background", "context_management")


def responses_to_chat(body: JSON) -> JSON:
    """An OpenAI Responses request as a chat completions request. ``body`` is not mutated."""
    for name in _RESPONSES_STATEFUL:
        if body.get(name):
            raise TranslationError(f"{name} is not supported by this engine")
    if body.get("top_logprobs"):
        raise TranslationError("top_logprobs: log probabilities are not translated from chat completions")
    out: JSON = {
        key: value
        for key, value in body.items()
        if key not in _RESPONSES_HANDLED and key not in _RESPONSES_DROPPED and key not in _RESPONSES_STATEFUL
    }
    if "model" in body:
        out["model"] = body["model"]
    chat = _ChatMessages()
    if body.get("instructions") is not None:
        chat.add({"role": "system", "content": _need_str(body["instructions"], "instructions")})
    items = body.get("input")
    if isinstance(items, str):
        chat.add({"role": "user", "content": items})
    elif items is not None:
        for i, item in enumerate(_need_list(items, "input")):
            _responses_item(chat, _need_obj(item, f"input[{i}]"), f"input[{i}]")
    # No prefill here: a Responses input ending in an assistant message asks for the next message.
    out["messages"] = chat.finish()
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if body.get(name) is not None:
            out[name] = body[name]
    _stream_fields(out, body.get("stream"))
    if body.get("tools") is not None:
        out["tools"] = [_responses_tool(t, f"tools[{k}]") for k, t in enumerate(_need_list(body["tools"], "tools"))]
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _responses_tool_choice(body["tool_choice"])
    text = body.get("text")
    if text is not None and _need_obj(text, "text").get("format") is not None:
        response_format = _responses_format(_need_obj(text["format"], "text.format"))
        if response_format is not None:
            out["response_format"] = response_format
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]
    user = body.get("user") if body.get("user") is not None else body.get("safety_identifier")
    if user is not None:
        out["user"] = user
    return out


def _responses_item(chat: _ChatMessages, item: JSON, path: str) -> None:
    kind = item.get("type")
    if kind == "function_call":
        call_id = _need_str(item.get("call_id"), f"{path}.call_id")
        name = _need_str(item.get("name"), f"{path}.name")
        arguments = _need_str(item.get("arguments", ""), f"{path}.arguments")
        chat.tool_call({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    elif kind == "function_call_output":
        call_id = _need_str(item.get("call_id"), f"{path}.call_id")
        output = item.get("output")
        if isinstance(output, str):
            chat.tool(call_id, output, [])
            return
        texts: list[str] = []
        images: list[JSON] = []
        for k, part in enumerate(_need_list(output, f"{path}.output")):
            converted = _responses_part(_need_obj(part, f"{path}.output[{k}]"), f"{path}.output[{k}]")
            if converted["type"] == "text":
                texts.append(converted["text"])
            else:
                images.append(converted)
        chat.tool(call_id, "\n".join(texts), images)
    elif kind == "reasoning":
        return  # reasoning items carry OpenAI's encrypted state; a chat template has no slot for them
    elif kind in (None, "message"):
        _responses_message(chat, item, path)
    else:
        raise _untranslatable(f"{path}.type", kind)


def _responses_part(part: JSON, path: str) -> JSON:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _need_str(part.get("text"), f"{path}.text")}
    if kind == "input_image":
        url = part.get("image_url")
        if url is None:
            # file_id references OpenAI's file store, which the engine cannot read.
            raise TranslationError(f"{path}.file_id: uploaded files cannot be translated to chat completions")
        image_url: JSON = {"url": _need_str(url, f"{path}.image_url")}
        if part.get("detail") is not None:
            image_url["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image_url}
    if kind in _CHAT_PARTS:
        return part
    raise _untranslatable(f"{path}.type", kind)


def _responses_message(chat: _ChatMessages, item: JSON, path: str) -> None:
    role = item.get("role")
    # Open chat templates know system, user and assistant; "developer" is OpenAI's name for system.
    chat_role = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}.get(role or "")
    if chat_role is None:
        raise _untranslatable(f"{path}.role", role)
    content = item.get("content")
    if isinstance(content, str):
        chat.add({"role": chat_role, "content": content})
        return
    raw_parts = _need_list(content, f"{path}.content")
    if chat_role == "assistant":
        texts: list[str] = []
        refusals: list[str] = []
        for k, raw in enumerate(raw_parts):
            part = _need_obj(raw, f"{path}.content[{k}]")
            if part.get("type") == "refusal":
                refusals.append(_need_str(part.get("refusal"), f"{path}.content[{k}].refusal"))
            elif part.get("type") in ("output_text", "input_text", "text"):
                texts.append(_need_str(part.get("text"), f"{path}.content[{k}].text"))
            else:
                raise _untranslatable(f"{path}.content[{k}].type", part.get("type"))
        message: JSON = {"role": "assistant", "content": "".join(texts)}
        if refusals:
            message["refusal"] = "".join(refusals)
        chat.add(message)
        return
    parts = [
        _responses_part(_need_obj(p, f"{path}.content[{k}]"), f"{path}.content[{k}]") for k, p in enumerate(raw_parts)
    ]
    if chat_role == "system":
        if any(p["type"] != "text" for p in parts):
            raise TranslationError(f"{path}.content: a system message can only hold text in chat completions")
        chat.add({"role": "system", "content": "\n\n".join(p["text"] for p in parts)})
        return
    chat.add({"role": "user", "content": parts})


def _responses_tool(tool: Any, path: str) -> JSON:
    tool = _need_obj(tool, path)
    if tool.get("type") != "function":
        raise _untranslatable(f"{path}.type", tool.get("type"))
    function: JSON = {"name": _need_str(tool.get("name"), f"{path}.name")}
    for name in ("description", "parameters", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


def _responses_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": _need_str(choice.get("name"), "tool_choice.name")}}
    if isinstance(choice, dict):
        raise _untranslatable("tool_choice.type", choice.get("type"))
    raise _untranslatable("tool_choice", choice)


def _responses_format(fmt: JSON) -> JSON | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema: JSON = {"name": fmt.get("name", "output"), "schema": fmt.get("schema")}
        for name in ("description", "strict"):
            if fmt.get(name) is not None:
                schema[name] = fmt[name]
        return {"type": "json_schema", "json_schema": schema}
    raise _untranslatable("text.format.type", kind)


# --------------------------------------------------------------------------------------------------
# Answers: shared mapping of chat fields


def _with_prefix(prefix: str, ident: Any) -> str:
    """An id in the client API's style, derived from the engine's so that logs can be correlated."""
    if not isinstance(ident, str) or not ident:
        return prefix + uuid.uuid4().hex
    if ident.startswith(prefix):
        return ident
    return prefix + ident.removeprefix("chatcmpl-")


def _tool_input(arguments: Any) -> JSON:
    """Anthropic tool input is an object; a model that wrote something else keeps it visible as _raw."""
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw": arguments}


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


# ---- non-streaming


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


# --------------------------------------------------------------------------------------------------
# Streams


class StreamTranslator(Protocol):
    """Turns one chat SSE stream into another API's SSE frames, event by event."""

    def feed(self, event: SSEEvent) -> list[bytes]:
        """One parsed chat event in; zero or more encoded frames (``event: x\\ndata: {...}\\n\\n``) out."""
        ...

    def finish(self) -> list[bytes]:
        """The upstream stream ended: the frames that close the client's stream (an error if truncated)."""
        ...


def _frame(event_type: str, payload: JSON) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class _StreamFault(Exception):
    """The engine's stream cannot be expressed in the client's grammar; ends it with an error event."""


@dataclass(slots=True)
class _Call:
    """A streamed tool call. ``slot`` is its block (Anthropic) or output (Responses) index once opened."""

    id: str | None = None
    name: str | None = None
    pending: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)
    slot: int | None = None
    item_id: str = ""


def _upstream_error(payload: Any) -> JSON:
    """The error object of an in-band chat error, whatever its wrapping."""
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            return inner
        if inner is not None:
            return {"message": str(inner)}
        return payload
    return {"message": str(payload)}


class _ChatStream:
    """Reads the chat chunk grammar; subclasses write the client's.

    The client grammars want one content block (or output item) open at a time, so this tracks which one
    is open: ``"text"``, a tool call's chat index, or None. Only choice 0 is read (see _first_choice).
    """

    def __init__(self) -> None:
        self._started = False
        self._closed = False
        self._open: str | int | None = None
        self._calls: dict[int, _Call] = {}
        self._finish_reason: str | None = None
        self._matched_stop: str | None = None
        self._usage: JSON | None = None
        self._text: list[str] = []

    def feed(self, event: SSEEvent) -> list[bytes]:
        if self._closed:
            return []
        data = event.data.strip()
        if not data:
            return []  # keep-alive
        if data == "[DONE]":
            if not self._started:
                return self._abort({"message": "upstream stream ended without any chunk"})
            return self._end()
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = None
            if event.event != "error":
                return self._abort({"message": f"upstream sent malformed JSON: {data[:200]!r}"})
        if event.event == "error":
            return self._abort(_upstream_error(payload if payload is not None else data))
        if not isinstance(payload, dict):
            return self._abort({"message": "upstream stream chunk is not a JSON object"})
        # vLLM and SGLang report failures mid-stream as `{"error": {...}}`; some servers flatten it.
        if payload.get("error") is not None or payload.get("object") == "error":
            return self._abort(_upstream_error(payload))
        try:
            return self._chunk(payload)
        except _StreamFault as exc:
            return self._abort({"message": str(exc)})

    def finish(self) -> list[bytes]:
        if self._closed:
            return []
        if self._finish_reason is None:
            return self._abort({"message": "upstream stream ended before the answer was complete"})
        # A stream with a finish_reason but no [DONE] only lacks the usage chunk: still a whole answer.
        return self._end()

    def _chunk(self, chunk: JSON) -> list[bytes]:
        frames: list[bytes] = []
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage  # with continuous usage stats every chunk carries a running total
        if not self._started:
            self._started = True
            frames += self._start(chunk)
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                frames += self._choice(choice)
        return frames

    def _choice(self, choice: JSON) -> list[bytes]:
        frames: list[bytes] = []
        delta = _dict(choice.get("delta"))
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self._open != "text":
                frames += self._close()
                frames += self._begin_text()
                self._open = "text"
            self._text.append(text)
            frames += self._text_delta(text)
        fragments = delta.get("tool_calls")
        for fragment in fragments if isinstance(fragments, list) else []:
            if isinstance(fragment, dict):
                frames += self._fragment(fragment)
        finish_reason = choice.get("finish_reason")
        if isinstance(finish_reason, str) and self._finish_reason is None:
            self._finish_reason = finish_reason
            if isinstance(choice.get("stop_reason"), str):
                self._matched_stop = choice["stop_reason"]
            frames += self._close_all()
        return frames

    def _fragment(self, fragment: JSON) -> list[bytes]:
        index = fragment.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            # Engines that omit the index start a new call with a new id; else the fragment continues.
            last = max(self._calls, default=None)
            new_id = fragment.get("id")
            if last is None:
                index = 0
            elif new_id and self._calls[last].id not in (None, new_id):
                index = last + 1
            else:
                index = last
        call = self._calls.setdefault(index, _Call())
        function = _dict(fragment.get("function"))
        # id and name arrive whole in the first fragment; some engines repeat them, so first one wins.
        if isinstance(fragment.get("id"), str) and fragment["id"]:
            call.id = call.id or fragment["id"]
        if isinstance(function.get("name"), str) and function["name"]:
            call.name = call.name or function["name"]
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        if call.slot is None:
            if arguments:
                call.pending.append(arguments)
            # A block cannot start without the tool's name: hold the arguments until it arrives.
            return self._open_call(index, call) if call.name else []
        if self._open != index:
            raise _StreamFault(f"upstream interleaved tool call {index} with another; cannot re-open it")
        if not arguments:
            return []
        call.arguments.append(arguments)
        return self._args_delta(call, arguments)

    def _open_call(self, index: int, call: _Call) -> list[bytes]:
        frames = self._close()
        if call.id is None:
            call.id = "call_" + uuid.uuid4().hex
        frames += self._begin_call(call)
        self._open = index
        if call.pending:
            joined = "".join(call.pending)
            call.pending.clear()
            call.arguments.append(joined)
            frames += self._args_delta(call, joined)
        return frames

    def _close(self) -> list[bytes]:
        is_open, self._open = self._open, None
        if is_open is None:
            return []
        if is_open == "text":
            text = "".join(self._text)
            self._text.clear()
            return self._end_text(text)
        return self._end_call(self._calls[int(is_open)])

    def _close_all(self) -> list[bytes]:
        frames: list[bytes] = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if call.slot is None:
                call.name = call.name or ""  # never named: still surface what the model produced
                frames += self._open_call(index, call)
        return frames + self._close()

    def _end(self) -> list[bytes]:
        frames = self._close_all()
        self._closed = True
        return frames + self._complete()

    def _abort(self, error: JSON) -> list[bytes]:
        self._closed = True
        return self._error(error)

    # Hooks, one per grammar event.
    def _start(self, chunk: JSON) -> list[bytes]:
        raise NotImplementedError

    def _begin_text(self) -> list[bytes]:
        raise NotImplementedError

    def _text_delta(self, text: str) -> list[bytes]:
        raise NotImplementedError

    def _end_text(self, text: str) -> list[bytes]:
        raise NotImplementedError

    def _begin_call(self, call: _Call) -> list[bytes]:
        raise NotImplementedError

    def _args_delta(self, call: _Call, arguments: str) -> list[bytes]:
        raise NotImplementedError

    def _end_call(self, call: _Call) -> list[bytes]:
        raise NotImplementedError

    def _complete(self) -> list[bytes]:
        raise NotImplementedError

    def _error(self, error: JSON) -> list[bytes]:
        raise NotImplementedError


# ---- chat stream -> Anthropic Messages stream

_ANTHROPIC_ERRORS_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_ANTHROPIC_ERROR_TYPES = frozenset((*_ANTHROPIC_ERRORS_BY_STATUS.values(), "api_error", "timeout_error"))


def _anthropic_error(error: JSON) -> JSON:
    kind = error.get("type")
    if kind not in _ANTHROPIC_ERROR_TYPES:
        # vLLM puts the HTTP status in `code` and a Python class name in `type`.
        kind = _ANTHROPIC_ERRORS_BY_STATUS.get(_int(error.get("code")), "api_error")
    message = error.get("message")
    return {
        "type": "error",
        "error": {"type": kind, "message": message if isinstance(message, str) and message else "upstream error"},
    }


class _MessagesStream(_ChatStream):
    def __init__(self, model: str, request_id: str) -> None:
        super().__init__()
        self._model = model
        self._id = _with_prefix("msg_", request_id)
        self._blocks = 0
        self._text_block = 0

    def _start(self, chunk: JSON) -> list[bytes]:
        usage = _anthropic_usage(self._usage)
        usage["output_tokens"] = 0  # message_delta reports the final count
        message: JSON = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        # The API follows message_start with a ping; clients skip it, but some proxies key on it.
        return [
            _frame("message_start", {"type": "message_start", "message": message}),
            _frame("ping", {"type": "ping"}),
        ]

    def _next_block(self) -> int:
        self._blocks += 1
        return self._blocks - 1

    def _begin_text(self) -> list[bytes]:
        self._text_block = self._next_block()
        block = {"type": "text", "text": ""}
        return [
            _frame(
                "content_block_start",
                {"type": "content_block_start", "index": self._text_block, "content_block": block},
            )
        ]

    def _text_delta(self, text: str) -> list[bytes]:
        delta = {"type": "text_delta", "text": text}
        return [
            _frame("content_block_delta", {"type": "content_block_delta", "index": self._text_block, "delta": delta})
        ]

    def _end_text(self, text: str) -> list[bytes]:
        return [_frame("content_block_stop", {"type": "content_block_stop", "index": self._text_block})]

    def _begin_call(self, call: _Call) -> list[bytes]:
        call.slot = self._next_block()
        block: JSON = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        return [
            _frame("content_block_start", {"type": "content_block_start", "index": call.slot, "content_block": block})
        ]

    def _args_delta(self, call: _Call, arguments: str) -> list[bytes]:
        delta = {"type": "input_json_delta", "partial_json": arguments}
        return [_frame("content_block_delta", {"type": "content_block_delta", "index": call.slot, "delta": delta})]

    def _end_call(self, call: _Call) -> list[bytes]:
        return [_frame("content_block_stop", {"type": "content_block_stop", "index": call.slot})]

    def _complete(self) -> list[bytes]:
        stop_reason, stop_sequence = _anthropic_stop(self._finish_reason, self._matched_stop)
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        usage = _anthropic_usage(self._usage, delta=True)
        return [
            _frame("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
            _frame("message_stop", {"type": "message_stop"}),
        ]

    def _error(self, error: JSON) -> list[bytes]:
        return [_frame("error", _anthropic_error(error))]


def chat_stream_to_messages(model: str, request_id: str) -> StreamTranslator:
    """A translator of one chat stream into an Anthropic Messages stream.

    ``model`` is the name the client asked for; the message id is ``request_id`` with a ``msg_`` prefix.
    """
    return _MessagesStream(model, request_id)


# ---- chat stream -> Responses stream


class _ResponsesStream(_ChatStream):
    def __init__(self, request: JSON, response_id: str) -> None:
        super().__init__()
        self._request = request
        self._id = _with_prefix("resp_", response_id)
        self._base = self._id.removeprefix("resp_")
        self._created_at = int(time.time())
        self._model: Any = None
        self._sequence = 0
        self._output: list[JSON] = []
        self._message_id = ""

    def _emit(self, event_type: str, **fields: Any) -> bytes:
        frame = _frame(event_type, {"type": event_type, "sequence_number": self._sequence, **fields})
        self._sequence += 1
        return frame

    def _response(self, status: str, incomplete: JSON | None = None, usage: JSON | None = None) -> JSON:
        return _response_object(
            self._request,
            response_id=self._id,
            created_at=self._created_at,
            model=self._model,
            status=status,
            incomplete_details=incomplete,
            output=list(self._output),
            usage=usage,
        )

    def _start(self, chunk: JSON) -> list[bytes]:
        self._model = chunk.get("model")
        response = self._response("in_progress")
        return [
            self._emit("response.created", response=response),
            self._emit("response.in_progress", response=response),
        ]

    def _item_status(self) -> str:
        return "incomplete" if _responses_status(self._finish_reason)[0] == "incomplete" else "completed"

    def _begin_text(self) -> list[bytes]:
        index = len(self._output)
        self._message_id = item_id = f"msg_{self._base}_{index}"
        item = {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._emit("response.output_item.added", output_index=index, item=item),
            self._emit("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=part),
        ]

    def _text_delta(self, text: str) -> list[bytes]:
        where = {"item_id": self._message_id, "output_index": len(self._output), "content_index": 0}
        return [self._emit("response.output_text.delta", **where, delta=text, logprobs=[])]

    def _end_text(self, text: str) -> list[bytes]:
        index = len(self._output)
        item = _message_item(self._message_id, text, self._item_status())
        where = {"item_id": self._message_id, "output_index": index, "content_index": 0}
        frames = [
            self._emit("response.output_text.done", **where, text=text, logprobs=[]),
            self._emit("response.content_part.done", **where, part=item["content"][0]),
            self._emit("response.output_item.done", output_index=index, item=item),
        ]
        self._output.append(item)
        return frames

    def _begin_call(self, call: _Call) -> list[bytes]:
        call.slot = len(self._output)
        call.item_id = f"fc_{self._base}_{call.slot}"
        item = _function_call_item(call.item_id, call.id or "", call.name or "", "", "in_progress")
        return [self._emit("response.output_item.added", output_index=call.slot, item=item)]

    def _args_delta(self, call: _Call, arguments: str) -> list[bytes]:
        return [
            self._emit(
                "response.function_call_arguments.delta", item_id=call.item_id, output_index=call.slot, delta=arguments
            )
        ]

    def _end_call(self, call: _Call) -> list[bytes]:
        arguments = "".join(call.arguments)
        item = _function_call_item(call.item_id, call.id or "", call.name or "", arguments, "completed")
        frames = [
            self._emit(
                "response.function_call_arguments.done",
                item_id=call.item_id,
                output_index=call.slot,
                name=call.name,
                arguments=arguments,
            ),
            self._emit("response.output_item.done", output_index=call.slot, item=item),
        ]
        self._output.append(item)
        return frames

    def _complete(self) -> list[bytes]:
        frames: list[bytes] = []
        if not self._output:
            # Same rule as chat_to_responses: an answer with neither text nor calls is an empty message.
            frames += self._begin_text()
            frames += self._end_text("")
        status, incomplete = _responses_status(self._finish_reason)
        response = self._response(status, incomplete, _responses_usage(self._usage))
        event_type = "response.completed" if status == "completed" else "response.incomplete"
        return [*frames, self._emit(event_type, response=response)]

    def _error(self, error: JSON) -> list[bytes]:
        code = error.get("code")
        if not isinstance(code, str):
            code = error.get("type") if isinstance(error.get("type"), str) else "server_error"
        message = error.get("message")
        message = message if isinstance(message, str) and message else "upstream error"
        param = error.get("param") if isinstance(error.get("param"), str) else None
        return [self._emit("error", code=code, message=message, param=param)]


def chat_stream_to_responses(request: JSON, response_id: str) -> StreamTranslator:
    """A translator of one chat stream into a Responses stream answering ``request``.

    ``response_id`` gets a ``resp_`` prefix unless it has one; ``request`` is the client's Responses request,
    whose settings the response object echoes.
    """
    return _ResponsesStream(request, response_id)
