"""Client requests as chat completions requests: Anthropic Messages and OpenAI Responses -> chat.

Policy for request fields. Each API's fields fall in four groups: translated; dropped because they only
tune things the engine does not have (thinking budgets, service tiers, cache hints, storage); refused
with :class:`TranslationError` because dropping them would silently change the answer (server-side
tools, stored conversation state); and unknown fields, which pass through unchanged so that engine
extensions sent with the SDKs' ``extra_body`` (``repetition_penalty``, ``min_p``...) still reach it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .common import JSON

# The chat form of a non-text content part, from the walker that checked it (`Classification.chat_part`):
# the translators never interpret media parts themselves, so they forward exactly what was checked.
PartForm = Callable[[JSON, str], JSON]


class TranslationError(ValueError):
    """A request field cannot be expressed as chat completions. The message starts with the field's path;
    ``param`` is that path too where the translator sets it (the OpenAI error's ``param``)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


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


def messages_to_chat(body: JSON, parts: PartForm) -> JSON:
    """An Anthropic Messages request as a chat completions request. ``body`` is not mutated.

    ``parts`` gives the chat form of each non-text block, as the walker checked it.
    """
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
        _anthropic_message(chat, _need_obj(message, f"messages[{i}]"), f"messages[{i}]", parts)
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


def _anthropic_part(block: JSON, path: str, parts: PartForm) -> JSON:
    """A user content block (or one inside a tool_result) as a chat content part."""
    if block.get("type") == "text":
        return {"type": "text", "text": _need_str(block.get("text"), f"{path}.text")}
    return parts(block, path)


def _anthropic_message(chat: _ChatMessages, message: JSON, path: str, form: PartForm) -> None:
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
            text, images = _anthropic_tool_result(block.get("content"), f"{block_path}.content", form)
            chat.tool(_need_str(block.get("tool_use_id"), f"{block_path}.tool_use_id"), text, images)
        else:
            parts.append(_anthropic_part(block, block_path, form))
    if parts or not any(b.get("type") == "tool_result" for b in blocks):
        chat.add({"role": "user", "content": parts})


def _anthropic_tool_result(content: Any, path: str, form: PartForm) -> tuple[str, list[JSON]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts: list[str] = []
    images: list[JSON] = []
    for k, block in enumerate(_need_list(content, path)):
        part = _anthropic_part(_need_obj(block, f"{path}[{k}]"), f"{path}[{k}]", form)
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


def responses_to_chat(body: JSON, parts: PartForm) -> JSON:
    """An OpenAI Responses request as a chat completions request. ``body`` is not mutated.

    ``parts`` gives the chat form of each non-text part, as the walker checked it.
    """
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
            _responses_item(chat, _need_obj(item, f"input[{i}]"), f"input[{i}]", parts)
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


def _responses_item(chat: _ChatMessages, item: JSON, path: str, form: PartForm) -> None:
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
            converted = _responses_part(_need_obj(part, f"{path}.output[{k}]"), f"{path}.output[{k}]", form)
            if converted["type"] == "text":
                texts.append(converted["text"])
            else:
                images.append(converted)
        chat.tool(call_id, "\n".join(texts), images)
    elif kind == "reasoning":
        return  # reasoning items carry OpenAI's encrypted state; a chat template has no slot for them
    elif kind in (None, "message"):
        _responses_message(chat, item, path, form)
    else:
        raise _untranslatable(f"{path}.type", kind)


def _responses_part(part: JSON, path: str, form: PartForm) -> JSON:
    if part.get("type") in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _need_str(part.get("text"), f"{path}.text")}
    return form(part, path)


def _responses_message(chat: _ChatMessages, item: JSON, path: str, form: PartForm) -> None:
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
        _responses_part(_need_obj(p, f"{path}.content[{k}]"), f"{path}.content[{k}]", form)
        for k, p in enumerate(raw_parts)
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
