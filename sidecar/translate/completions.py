"""OpenAI legacy completions over chat: a ``/v1/completions`` request as chat, its answers back as ``text_completion``.

The request's prompt becomes one user message, so the engine's chat template frames it and the model
answers it as a chat turn. Sampling options mean the same in both APIs and pass through unchanged, as do
unknown fields (engine extensions such as ``top_k``, ``repetition_penalty``). What only completions can
express is refused with :class:`TranslationError` rather than dropped, since dropping it would silently
change the answer: token-id and batched prompts, ``echo``, ``suffix``, ``best_of`` > 1 and
completions-style ``logprobs``.

Answers map one to one: a ``chat.completion`` becomes a ``text_completion`` (every choice, so ``n`` works),
each ``chat.completion.chunk`` a ``text_completion`` chunk, ``[DONE]`` stays. Errors are OpenAI's error
object in both APIs; the engine's are normalised the way the Responses route normalises them.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from sidecar.errors import SidecarError
from sidecar.families import error_event
from sidecar.sse import SSEEvent

from .answers import chat_error_to_responses, engine_error
from .common import JSON, _dict, _int, _with_prefix
from .requests import TranslationError
from .streams import StreamTranslator

# Completions' own default, which chat does not share (it generates up to the context length).
DEFAULT_MAX_TOKENS = 16

# Fields read here; every other one passes through to chat unchanged (see the module docstring).
_HANDLED = frozenset(("model", "prompt", "max_tokens", "echo", "suffix", "best_of", "logprobs"))
_OFFLOAD = "offload mode translates /v1/completions to chat completions, which cannot express"


def _refused(field: str, what: str) -> TranslationError:
    return TranslationError(f"{field}: {_OFFLOAD} {what}", param=field)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise TranslationError("prompt: is required", param="prompt")
    if isinstance(prompt, list):
        if any(_is_token(item) or isinstance(item, list) for item in prompt):
            raise _refused("prompt", "a prompt of token ids; send it as text")
        if len(prompt) > 1:
            raise _refused("prompt", f"several prompts in one request (got {len(prompt)}); send one per request")
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
    raise TranslationError("prompt: expected a string or an array of exactly one string", param="prompt")


def completions_to_chat(body: JSON) -> JSON:
    """A legacy completions request as a chat completions request. ``body`` is not mutated."""
    text = _prompt_text(body.get("prompt"))
    if body.get("echo"):
        raise _refused("echo", "echo (the prompt repeated in the answer)")
    if body.get("suffix"):  # null and "" ask for nothing
        raise _refused("suffix", "suffix (text to follow the completion)")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise _refused("best_of", f"best_of={best_of!r} (the best of several completions)")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise _refused("logprobs", f"logprobs={logprobs!r} (completions-style log probabilities)")
    out: JSON = {}
    if "model" in body:
        out["model"] = body["model"]
    out["messages"] = [{"role": "user", "content": text}]
    # Absent means completions' default; an explicit value (null included) is the client's to give.
    out["max_tokens"] = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    out.update((key, value) for key, value in body.items() if key not in _HANDLED)
    return out


def _choice(choice: JSON, position: int, text: Any) -> JSON:
    out: JSON = {
        "index": _int(choice.get("index", position)),
        "text": text if isinstance(text, str) else "",
        "logprobs": None,  # refused in the request: chat's logprobs are not the completions shape
        "finish_reason": choice.get("finish_reason"),
    }
    if "stop_reason" in choice:  # vLLM's matched stop string or token, in both APIs
        out["stop_reason"] = choice["stop_reason"]
    return out


def _completion(completion_id: str, chunk: JSON, model: str, choices: list[JSON]) -> JSON:
    created = chunk.get("created")
    out: JSON = {
        "id": completion_id,
        "object": "text_completion",
        "created": created if _is_token(created) else int(time.time()),
        "model": chunk.get("model") or model,
        "choices": choices,
    }
    if isinstance(chunk.get("system_fingerprint"), str):
        out["system_fingerprint"] = chunk["system_fingerprint"]
    if "usage" in chunk:
        out["usage"] = chunk["usage"]
    return out


def _choices(chat: JSON, text_of: str) -> list[JSON]:
    raw = chat.get("choices")
    return [
        _choice(choice, k, _dict(choice.get(text_of)).get("content"))
        for k, choice in enumerate(raw if isinstance(raw, list) else [])
        if isinstance(choice, dict)
    ]


def chat_to_completions(chat_response: JSON, model: str) -> JSON:
    """A ``chat.completion`` as a ``text_completion``. ``model``, the requested one, stands in for a missing one."""
    completion_id = _with_prefix("cmpl-", chat_response.get("id"))
    return _completion(completion_id, chat_response, model, _choices(chat_response, "message"))


def chat_error_to_completions(status: int, payload: Any) -> JSON:
    """An engine's error answer as OpenAI's error object, which is what completions answer with too."""
    return chat_error_to_responses(status, payload)


def _data(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class _CompletionsStream:
    """Chunk by chunk; an engine error, malformed JSON or a truncated stream ends it with an error event."""

    def __init__(self, model: str, completion_id: str) -> None:
        self._model = model
        self._fallback_id = completion_id
        self._id: str | None = None
        self._finished = False  # a choice reported its finish_reason: the answer is whole
        self._closed = False

    def feed(self, event: SSEEvent) -> list[bytes]:
        if self._closed:
            return []
        data = event.data.strip()
        if not data:
            return []  # keep-alive
        if data == "[DONE]":
            if self._id is None:
                return self._error({"message": "upstream stream ended without any chunk"})
            self._closed = True
            return [_DONE]
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = data if event.event == "error" else None
            if payload is None:
                return self._error({"message": f"upstream sent malformed JSON: {data[:200]!r}"})
        if event.event == "error":
            return self._error(payload)
        if not isinstance(payload, dict):
            return self._error({"message": "upstream stream chunk is not a JSON object"})
        if payload.get("error") is not None or payload.get("object") == "error":
            return self._error(payload)
        if self._id is None:
            ident = payload.get("id")
            self._id = _with_prefix("cmpl-", ident if isinstance(ident, str) and ident else self._fallback_id)
        choices = _choices(payload, "delta")
        self._finished = self._finished or any(c["finish_reason"] is not None for c in choices)
        return [_data(_completion(self._id, payload, self._model, choices))]

    def finish(self) -> list[bytes]:
        if self._closed:
            return []
        if not self._finished:
            return self._error({"message": "upstream stream ended before the answer was complete"})
        # A finish_reason but no [DONE]: only the terminator (and perhaps the usage chunk) is missing.
        self._closed = True
        return [_DONE]

    def fail(self, error: SidecarError) -> list[bytes]:
        if self._closed:
            return []
        self._closed = True
        return [error_event("openai", error)]

    def _error(self, payload: Any) -> list[bytes]:
        self._closed = True
        # In-band errors carry their status in `code` (vLLM) when they carry one.
        code = _int(engine_error(payload).get("code"))
        status = code if 400 <= code < 600 else 500
        return [_data(chat_error_to_responses(status, payload))]


def chat_stream_to_completions(model: str, completion_id: str) -> StreamTranslator:
    """A translator of one chat stream into a completions stream.

    ``model`` is the name the client asked for (used where a chunk has none); chunk ids are the engine's
    with a ``cmpl-`` prefix, or ``completion_id`` if the engine gave none.
    """
    return _CompletionsStream(model, completion_id)
