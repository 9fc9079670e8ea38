"""Re-assembly of an upstream SSE stream into the non-streaming JSON answer a client asked for.

The sidecar sends a non-streaming multimodal request upstream as a streaming one, so that the engine's
first chunk can serve as its acknowledgement. This module owns the payload-level halves of that trick,
for the four API kinds the sidecar fronts (OpenAI chat completions, legacy completions, Responses, and
Anthropic Messages):

* :func:`can_upgrade` decides whether a request may go as a stream at all: not when the stream form cannot
  express what the client asked for (:func:`upgrade_refusal` says why);
* :func:`upgrade_request` rewrites the request body to ask for a stream (plus usage, where the API only
  reports usage in streams on request);
* :func:`assembler_for` returns an :class:`Assembler` that folds the parsed :class:`~sidecar.sse.SSEEvent`
  sequence back into the object the API would have returned without streaming, in the engine's
  non-streaming shape (:mod:`sidecar.answer_shapes`).

The rule: a non-streaming answer through the sidecar equals, field for field, what the engine answers
directly to the same request, but for ids and creation times. Fields the assemblers do not know are
carried through: top-level chunk fields (last non-null value wins: they repeat per chunk, as vLLM's
`prompt_token_ids` does once per choice) and choice-level ones (lists extend, as per-token `token_ids`
do; other values last non-null wins); delta-level ones as described at :class:`_ChatAssembler`.

It does no I/O. Whatever the upstream sends, the assemblers raise nothing but :class:`StreamError`: an
error the engine reported in-band, a malformed event (bad JSON, wrong JSON types), or a stream that ended
before the API's end-of-stream marker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import orjson

from sidecar.answer_shapes import Engine, shape_answer
from sidecar.sse import SSEEvent

__all__ = [
    "Assembler",
    "Kind",
    "StreamError",
    "assembler_for",
    "can_upgrade",
    "upgrade_refusal",
    "upgrade_request",
]

Kind = Literal["chat", "completions", "responses", "messages"]

_DONE = "[DONE]"
_PREVIEW_CHARS = 200


class StreamError(Exception):
    """The upstream reported an error in-band, or the stream is malformed or incomplete.

    ``upstream_error`` is set only when the engine itself reported the error; it is the engine's error
    object (the value of the ``error`` field for OpenAI-style and Anthropic streams, the event minus
    ``type``/``sequence_number`` for a Responses ``error`` event), suitable for relaying to the client.
    """

    def __init__(self, message: str, *, upstream_error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream_error = upstream_error


# --------------------------------------------------------------------------------------------------
# Request side


# Responses `include` entry that asks for output logprobs.
_RESPONSES_LOGPROBS = "message.output_text.logprobs"


def upgrade_refusal(kind: Kind, body: dict[str, Any]) -> str | None:
    """Why the request must go upstream as the client sent it, or None when it may be upgraded.

    A request is not upgraded when its stream cannot express the answer the engine gives without one
    (each rule names the vLLM 0.32 source it comes from, under ``vllm/entrypoints``); it then holds
    its gate slot until its whole answer arrives. The rules hold whatever ``upstream.engine`` says: an
    engine without the option ignores it, and the request only loses the early ack.
    """
    if body.get("stream"):
        return "the client asked for a stream"
    if kind != "responses":
        # Disaggregated prefill (kv) and encoding (ec): the engine's transfer parameters come back in
        # the non-streaming answer only (chat_completion/serving.py chat_completion_full_generator,
        # completion/serving.py request_output_to_completion_response, anthropic/serving.py
        # messages_full_converter); no chunk model has the fields. A Responses stream's terminal
        # response has them (responses/context.py keeps each output's).
        for option in ("kv_transfer_params", "ec_transfer_params"):
            if body.get(option) is not None:
                return f"{option}: the engine returns its transfer parameters in non-streaming answers only"
    if kind in ("chat", "completions"):
        if body.get("stream_options"):
            # Refused without a stream (chat_completion/protocol.py, completion/protocol.py
            # validate_stream_options): the client gets the engine's 400, not an answer.
            return "stream_options: the engine refuses it on a non-streaming request"
        if body.get("prompt_logprobs") is not None:
            # Refused on a stream when > 0 or -1 (protocol.py check_logprobs), and 0 still returns a list
            # in the non-streaming answer that no stream chunk carries.
            return "prompt_logprobs: the stream form has no prompt logprobs"
        if body.get("echo"):
            # Echo turns prompt logprobs on (protocol.py to_sampling_params: prompt_logprobs = top_logprobs
            # or logprobs) and they are answered without a stream only; chat's streamed echo also sends
            # a list-of-parts content raw where the answer joins its texts.
            return "echo: the echoed prompt's logprobs exist in the non-streaming answer only"
        if body.get("use_beam_search"):
            # Refused on a completions stream (completion/serving.py); a beam search answers at its end
            # anyway, so a stream would not ack it early.
            return "use_beam_search: the engine answers a beam search only once it is over"
    if kind == "responses":
        if body.get("background"):
            # A background request is answered at once with a queued response (responses/serving.py);
            # assembled from a stream it would become the completed one.
            return "background: the answer is the queued response, not the finished one"
        include = body.get("include")
        if isinstance(include, list) and _RESPONSES_LOGPROBS in include:
            # The stream skips every token whose text is empty (responses/serving.py
            # _process_simple_streaming_events, streaming_events.py resolve_target_state), so the
            # terminal response loses those tokens' logprobs.
            return "include message.output_text.logprobs: the stream drops the logprobs of empty-text tokens"
    return None


def can_upgrade(kind: Kind, body: dict[str, Any]) -> bool:
    """Whether a non-streaming request may go upstream as a stream (see :func:`upgrade_refusal`)."""
    return upgrade_refusal(kind, body) is None


def upgrade_request(kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
    """Return a new body that asks for a stream. ``body`` is not mutated.

    The copy is shallow: nested values other than ``stream_options`` are shared with ``body``.
    Chat and completions only report usage in a stream when ``stream_options.include_usage`` is set,
    and the non-streaming answer must carry usage, so it is forced on (other options are kept).
    """
    upgraded = dict(body)
    upgraded["stream"] = True
    if kind in ("chat", "completions"):
        existing = body.get("stream_options")
        options: dict[str, Any] = dict(existing) if isinstance(existing, dict) else {}
        options["include_usage"] = True
        upgraded["stream_options"] = options
    return upgraded


# --------------------------------------------------------------------------------------------------
# Defensive JSON helpers: every shape check raises StreamError, never TypeError/KeyError.


def _preview(text: str) -> str:
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "..."


def _loads(data: str, kind: Kind) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StreamError(f"unparseable JSON in {kind} stream event: {_preview(data)!r}") from exc


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StreamError(f"{what} is not a JSON object (got {type(value).__name__})")
    return value


def _opt_obj(value: Any, what: str) -> dict[str, Any] | None:
    return None if value is None else _obj(value, what)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise StreamError(f"{what} is not a JSON array (got {type(value).__name__})")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise StreamError(f"{what} is not a string (got {type(value).__name__})")


def _index(value: Any, what: str) -> int:
    # bool is an int subclass; `true` as an index is garbage, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StreamError(f"{what} is not a non-negative integer (got {value!r})")
    return value


def _upstream_error(kind: Kind, error: dict[str, Any]) -> StreamError:
    message = error.get("message")
    detail = message if isinstance(message, str) and message else _preview(repr(error))
    return StreamError(f"upstream {kind} stream reported an error: {detail}", upstream_error=error)


def _error_from_payload(payload: Any) -> dict[str, Any]:
    """The error object out of an error event's payload, whatever its wrapping."""
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):
            return inner
        if inner is not None:
            return {"message": str(inner)}
        return {k: v for k, v in payload.items() if k not in ("type", "sequence_number")}
    return {"message": str(payload)}


def _error_event(kind: Kind, data: str) -> StreamError:
    """An SSE event explicitly typed ``error``: relay its payload even when it is not JSON."""
    try:
        payload: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        payload = data
    return _upstream_error(kind, _error_from_payload(payload))


def _merge_logprobs(acc: dict[str, Any] | None, logprobs: Any, what: str) -> dict[str, Any] | None:
    """Concatenate the per-token lists of streamed logprobs.

    Works for both shapes: chat (``content``/``refusal`` lists) and completions (``tokens``,
    ``token_logprobs``, ``top_logprobs``, ``text_offset``). A null list in one chunk does not erase
    what earlier chunks contributed.
    """
    chunk = _opt_obj(logprobs, what)
    if chunk is None:
        return acc
    merged: dict[str, Any] = {} if acc is None else acc
    for key, value in chunk.items():
        if isinstance(value, list):
            existing = merged.get(key)
            if isinstance(existing, list):
                existing.extend(value)
            else:
                merged[key] = list(value)
        elif value is None:
            merged.setdefault(key, None)
        else:
            merged[key] = value
    return merged


def _copy_logprobs(logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {k: list(v) if isinstance(v, list) else v for k, v in logprobs.items()}


def _carry(acc: dict[str, Any], key: str, value: Any, *, extend: bool) -> None:
    """Fold one chunk's value of a field the assembler does not know into ``acc``.

    A null keeps the key (null) without erasing an earlier value; a list extends the lists before it
    when ``extend`` (choice-level fields are per-token deltas); anything else is the latest value.
    """
    if value is None:
        acc.setdefault(key, None)
        return
    previous = acc.get(key)
    if extend and isinstance(value, list) and isinstance(previous, list):
        previous.extend(value)
    else:
        acc[key] = list(value) if extend and isinstance(value, list) else value


# --------------------------------------------------------------------------------------------------
# Assemblers


class Assembler(Protocol):
    """Folds one upstream stream's events into the non-streaming answer.

    ``add`` every event in order (events after the end-of-stream marker are ignored); ``done`` turns
    True once that marker has been seen, so the caller may stop reading; ``result`` builds the answer
    or raises :class:`StreamError` if the stream is incomplete. ``add`` raises :class:`StreamError` on
    an in-band upstream error or a malformed event; the assembler must then be discarded.
    """

    @property
    def done(self) -> bool: ...

    def add(self, event: SSEEvent) -> None: ...

    def result(self) -> dict[str, Any]: ...


class _Base:
    """Turns any unexpected exception from the per-kind logic into StreamError.

    The per-kind code validates shapes explicitly; this net exists so that a shape nobody anticipated
    still surfaces as a StreamError (→ a clean 502 for the client) rather than an unhandled crash.
    """

    kind: ClassVar[Kind]

    def __init__(self, engine: Engine = "generic") -> None:
        self._done = False
        self._engine: Engine = engine

    @property
    def done(self) -> bool:
        return self._done

    def add(self, event: SSEEvent) -> None:
        if self._done:
            return
        try:
            self._add(event)
        except StreamError:
            raise
        except Exception as exc:
            raise StreamError(f"malformed {self.kind} stream event: {exc!r}") from exc

    def result(self) -> dict[str, Any]:
        try:
            return shape_answer(self.kind, self._engine, self._result())
        except StreamError:
            raise
        except Exception as exc:
            raise StreamError(f"cannot assemble {self.kind} stream: {exc!r}") from exc

    def _add(self, event: SSEEvent) -> None:
        raise NotImplementedError

    def _result(self) -> dict[str, Any]:
        raise NotImplementedError


class _OpenAIChunks(_Base):
    """Shared top level of chat and completions streams: chunk objects with ``choices``, ``[DONE]``."""

    object_name: ClassVar[str]

    def __init__(self, engine: Engine = "generic") -> None:
        super().__init__(engine)
        self._chunks = 0
        self._meta: dict[str, Any] = {}
        self._usage: dict[str, Any] | None = None
        self._extra: dict[str, Any] = {}  # top-level fields this code does not know, carried through

    def _add(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if data == _DONE:
            self._done = True
            return
        if not data:
            return  # an empty data line carries nothing; some proxies use it as a keep-alive
        if event.event == "error":
            raise _error_event(self.kind, data)
        chunk = _obj(_loads(data, self.kind), f"{self.kind} stream chunk")
        # vLLM and SGLang report failures mid-stream as `data: {"error": {...}}`; some servers send the
        # flat OpenAI-style error object (`"object": "error"`) instead.
        if chunk.get("error") is not None:
            raise _upstream_error(self.kind, _error_from_payload(chunk))
        if chunk.get("object") == "error":
            raise _upstream_error(self.kind, chunk)
        self._chunks += 1
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            value = chunk.get(key)
            if value is not None and key not in self._meta:
                self._meta[key] = value
        usage = chunk.get("usage")
        if usage is not None:
            # Last one wins: with vLLM's continuous_usage_stats every chunk carries a running total.
            self._usage = _obj(usage, "usage")
        for key, value in chunk.items():
            if key not in _CHUNK_KNOWN:
                # Response-level values repeat (vLLM sends prompt_token_ids once per choice): never extended.
                _carry(self._extra, key, value, extend=False)
        choices = chunk.get("choices")
        for raw in [] if choices is None else _list(choices, "choices"):
            choice = _obj(raw, "choice")
            self._add_choice(_index(choice.get("index", 0), "choice index"), choice)

    def _add_choice(self, index: int, choice: dict[str, Any]) -> None:
        raise NotImplementedError

    def _all_finished(self) -> bool:
        raise NotImplementedError

    def _choices(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _result(self) -> dict[str, Any]:
        if self._chunks == 0:
            raise StreamError(f"{self.kind} stream ended without any chunk")
        # [DONE] is the real end marker. A stream that stopped after every choice got its
        # finish_reason is accepted too (only the trailing usage chunk can be missing then), so an
        # engine that omits [DONE] still works; anything else is a truncated answer.
        if not self._done and not self._all_finished():
            raise StreamError(f"{self.kind} stream ended before [DONE]")
        result: dict[str, Any] = {
            "id": self._meta.get("id"),
            "object": self.object_name,
            "created": self._meta.get("created"),
            "model": self._meta.get("model"),
            "choices": self._choices(),
            "usage": self._usage,
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in self._meta:
                result[key] = self._meta[key]
        for key, value in self._extra.items():
            result.setdefault(key, value)
        return result


# Top-level chunk fields folded explicitly; any other is carried through (`_carry`).
_CHUNK_KNOWN = frozenset(
    ("id", "object", "created", "model", "system_fingerprint", "service_tier", "usage", "choices", "error")
)
# Choice-level fields folded explicitly, per kind; any other is carried through.
_CHAT_KNOWN_CHOICE = frozenset(("index", "delta", "logprobs", "finish_reason", "stop_reason"))
_TEXT_KNOWN_CHOICE = frozenset(("index", "text", "logprobs", "finish_reason", "stop_reason"))


@dataclass(slots=True)
class _Call:
    """A tool call (or legacy function_call) being assembled from fragments."""

    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)

    def merge(self, fragment: dict[str, Any], function: dict[str, Any] | None, what: str) -> None:
        # id/type/name arrive whole in the first fragment; some engines repeat them in later fragments,
        # so the first non-empty value is kept instead of concatenating.
        self.id = self.id or _opt_str(fragment.get("id"), f"{what} id")
        self.type = self.type or _opt_str(fragment.get("type"), f"{what} type")
        if function is not None:
            self.name = self.name or _opt_str(function.get("name"), f"{what} name")
            arguments = _opt_str(function.get("arguments"), f"{what} arguments")
            if arguments:
                self.arguments.append(arguments)


# Delta fields accumulated as text. The reasoning ones are vLLM/SGLang extensions (vLLM renamed
# reasoning_content to reasoning; both are kept so either engine version round-trips).
_CHAT_TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")
_CHAT_KNOWN_DELTA = frozenset((*_CHAT_TEXT_FIELDS, "role", "tool_calls", "function_call"))


class _HasId(Protocol):
    id: str | None


def unindexed_call_slot(calls: Mapping[int, _HasId], new_id: str | None) -> int:
    """Where a tool-call fragment without an `index` goes: engines that omit the index start a new
    call by sending a new id; otherwise the fragment continues the latest call."""
    last = max(calls, default=None)
    if last is None:
        return 0
    if new_id and calls[last].id not in (None, new_id):
        return last + 1
    return last


@dataclass(slots=True)
class _ChatChoice:
    role: str | None = None
    text: dict[str, list[str]] = field(default_factory=dict)
    tool_calls: dict[int, _Call] = field(default_factory=dict)
    function_call: _Call | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    finish_reason: Any = None
    has_stop_reason: bool = False
    stop_reason: Any = None
    logprobs: dict[str, Any] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # choice-level fields carried through


class _ChatAssembler(_OpenAIChunks):
    """Chat chunks. Delta fields it does not know are carried into the message: text concatenates,
    lists extend, anything else last-wins."""

    kind: ClassVar[Kind] = "chat"
    object_name: ClassVar[str] = "chat.completion"

    def __init__(self, engine: Engine = "generic") -> None:
        super().__init__(engine)
        self._by_index: dict[int, _ChatChoice] = {}

    def _add_choice(self, index: int, choice: dict[str, Any]) -> None:
        acc = self._by_index.setdefault(index, _ChatChoice())
        delta = _opt_obj(choice.get("delta"), "delta") or {}
        acc.role = acc.role or _opt_str(delta.get("role"), "delta role")
        for name in _CHAT_TEXT_FIELDS:
            piece = _opt_str(delta.get(name), f"delta {name}")
            if piece is not None:
                acc.text.setdefault(name, []).append(piece)
        tool_calls = delta.get("tool_calls")
        if tool_calls is not None:
            for raw in _list(tool_calls, "delta tool_calls"):
                self._add_tool_call(acc, _obj(raw, "tool call delta"))
        function_call = _opt_obj(delta.get("function_call"), "delta function_call")
        if function_call is not None:
            if acc.function_call is None:
                acc.function_call = _Call()
            acc.function_call.merge({}, function_call, "function_call")
        for key, value in delta.items():
            if key not in _CHAT_KNOWN_DELTA and value is not None:
                # Unknown engine extensions: text concatenates, lists extend, anything else last-wins.
                previous = acc.extra.get(key)
                same_sequence = isinstance(value, str | list) and type(previous) is type(value)
                acc.extra[key] = previous + value if same_sequence else value
        if choice.get("finish_reason") is not None:
            acc.finish_reason = choice["finish_reason"]
        if "stop_reason" in choice:
            acc.has_stop_reason = True
            if choice["stop_reason"] is not None:
                acc.stop_reason = choice["stop_reason"]
        acc.logprobs = _merge_logprobs(acc.logprobs, choice.get("logprobs"), "logprobs")
        for key, value in choice.items():
            if key not in _CHAT_KNOWN_CHOICE:
                _carry(acc.fields, key, value, extend=True)  # vLLM's per-token token_ids

    @staticmethod
    def _add_tool_call(acc: _ChatChoice, fragment: dict[str, Any]) -> None:
        raw_index = fragment.get("index")
        if raw_index is not None:
            index = _index(raw_index, "tool call index")
        else:
            index = unindexed_call_slot(acc.tool_calls, _opt_str(fragment.get("id"), "tool call id"))
        call = acc.tool_calls.setdefault(index, _Call())
        call.merge(fragment, _opt_obj(fragment.get("function"), "tool call function"), "tool call")

    def _all_finished(self) -> bool:
        return bool(self._by_index) and all(c.finish_reason is not None for c in self._by_index.values())

    def _choices(self) -> list[dict[str, Any]]:
        choices: list[dict[str, Any]] = []
        for index in sorted(self._by_index):
            acc = self._by_index[index]
            message: dict[str, Any] = {"role": acc.role or "assistant", "content": None}
            for name in _CHAT_TEXT_FIELDS:
                if name in acc.text:
                    message[name] = "".join(acc.text[name])
            if acc.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": call.type or "function",
                        "function": {"name": call.name or "", "arguments": "".join(call.arguments)},
                    }
                    for _, call in sorted(acc.tool_calls.items())
                ]
            if acc.function_call is not None:
                message["function_call"] = {
                    "name": acc.function_call.name or "",
                    "arguments": "".join(acc.function_call.arguments),
                }
            message.update(acc.extra)
            out: dict[str, Any] = {
                "index": index,
                "message": message,
                "logprobs": _copy_logprobs(acc.logprobs),
                "finish_reason": acc.finish_reason,
            }
            if acc.has_stop_reason:
                out["stop_reason"] = acc.stop_reason
            for key, value in acc.fields.items():
                out.setdefault(key, _copy_value(value))
            choices.append(out)
        return choices


def _copy_value(value: Any) -> Any:
    """A carried list is copied, so that a result never shares the assembler's accumulators."""
    return list(value) if isinstance(value, list) else value


@dataclass(slots=True)
class _TextChoice:
    text: list[str] = field(default_factory=list)
    finish_reason: Any = None
    has_stop_reason: bool = False
    stop_reason: Any = None
    logprobs: dict[str, Any] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # choice-level fields carried through


class _CompletionsAssembler(_OpenAIChunks):
    kind: ClassVar[Kind] = "completions"
    object_name: ClassVar[str] = "text_completion"

    def __init__(self, engine: Engine = "generic") -> None:
        super().__init__(engine)
        self._by_index: dict[int, _TextChoice] = {}

    def _add_choice(self, index: int, choice: dict[str, Any]) -> None:
        acc = self._by_index.setdefault(index, _TextChoice())
        text = _opt_str(choice.get("text"), "choice text")
        if text:
            acc.text.append(text)
        if choice.get("finish_reason") is not None:
            acc.finish_reason = choice["finish_reason"]
        if "stop_reason" in choice:
            acc.has_stop_reason = True
            if choice["stop_reason"] is not None:
                acc.stop_reason = choice["stop_reason"]
        acc.logprobs = _merge_logprobs(acc.logprobs, choice.get("logprobs"), "logprobs")
        for key, value in choice.items():
            if key not in _TEXT_KNOWN_CHOICE:
                _carry(acc.fields, key, value, extend=True)  # vLLM's token_ids, prompt_token_ids

    def _all_finished(self) -> bool:
        return bool(self._by_index) and all(c.finish_reason is not None for c in self._by_index.values())

    def _choices(self) -> list[dict[str, Any]]:
        choices: list[dict[str, Any]] = []
        for index in sorted(self._by_index):
            acc = self._by_index[index]
            out: dict[str, Any] = {
                "index": index,
                "text": "".join(acc.text),
                "logprobs": _copy_logprobs(acc.logprobs),
                "finish_reason": acc.finish_reason,
            }
            if acc.has_stop_reason:
                out["stop_reason"] = acc.stop_reason
            for key, value in acc.fields.items():
                out.setdefault(key, _copy_value(value))
            choices.append(out)
        return choices


_RESPONSES_TERMINAL = frozenset(("response.completed", "response.incomplete", "response.failed"))


class _ResponsesAssembler(_Base):
    """The terminal event already carries the full response object, so no delta needs replaying."""

    kind: ClassVar[Kind] = "responses"

    def __init__(self, engine: Engine = "generic") -> None:
        super().__init__(engine)
        self._response: dict[str, Any] | None = None

    def _add(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if not data or data == _DONE:
            return
        if event.event == "error":
            raise _error_event(self.kind, data)
        payload = _obj(_loads(data, self.kind), "responses stream event")
        event_type = payload.get("type")
        if not isinstance(event_type, str):
            event_type = event.event
        if event_type == "error":
            raise _upstream_error(self.kind, _error_from_payload(payload))
        if event_type in _RESPONSES_TERMINAL:
            # A failed response is still the answer: the caller relays it (status "failed", its error).
            self._response = _obj(payload.get("response"), f"{event_type} response")
            self._done = True

    def _result(self) -> dict[str, Any]:
        if self._response is None:
            raise StreamError("stream ended before response.completed")
        return self._response


@dataclass(slots=True)
class _Block:
    """An Anthropic content block: the start payload plus the fragments appended to it since."""

    base: dict[str, Any]
    text: dict[str, list[str]] = field(default_factory=dict)
    partial_json: list[str] | None = None
    citations: list[Any] | None = None

    def build(self) -> dict[str, Any]:
        block = dict(self.base)
        for key, pieces in self.text.items():
            start = _opt_str(block.get(key), f"content block {key}") or ""
            block[key] = start + "".join(pieces)
        if self.citations is not None:
            existing = block.get("citations")
            block["citations"] = (list(existing) if isinstance(existing, list) else []) + self.citations
        if self.partial_json is not None:
            block["input"] = self._parse_input()
        return block

    def finish(self) -> None:
        """At content_block_stop: parse the tool input now, so bad JSON fails at the event that ends it."""
        if self.partial_json is not None:
            self.base["input"] = self._parse_input()
            self.partial_json = None

    def _parse_input(self) -> Any:
        raw = "".join(self.partial_json or ())
        if not raw.strip():
            return {}  # a tool called without arguments streams no (or only empty) partial_json
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise StreamError(f"tool_use input is not valid JSON: {_preview(raw)!r}") from exc


# delta type -> block field the delta's same-named payload is appended to.
_MESSAGES_TEXT_DELTAS = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "signature_delta": "signature",
}


class _MessagesAssembler(_Base):
    kind: ClassVar[Kind] = "messages"

    def __init__(self, engine: Engine = "generic") -> None:
        super().__init__(engine)
        self._message: dict[str, Any] | None = None
        self._blocks: dict[int, _Block] = {}

    def _add(self, event: SSEEvent) -> None:
        data = event.data.strip()
        if not data or data == _DONE:
            return
        if event.event == "error":
            raise _error_event(self.kind, data)
        payload = _obj(_loads(data, self.kind), "messages stream event")
        event_type = payload.get("type")
        if not isinstance(event_type, str):
            event_type = event.event
        if event_type == "error":
            raise _upstream_error(self.kind, _error_from_payload(payload))
        if event_type == "message_start":
            self._start(_obj(payload.get("message"), "message_start message"))
            return
        if event_type not in (
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ):
            return  # ping, and event types newer than this code: nothing to fold in
        message = self._message
        if message is None:
            raise StreamError(f"messages stream sent {event_type} before message_start")
        if event_type == "content_block_start":
            index = _index(payload.get("index"), "content block index")
            block = _obj(payload.get("content_block"), "content_block")
            self._blocks[index] = _Block(base=dict(block))
        elif event_type == "content_block_delta":
            self._delta(self._block(payload), _obj(payload.get("delta"), "content_block_delta delta"))
        elif event_type == "content_block_stop":
            self._block(payload).finish()
        elif event_type == "message_delta":
            delta = _opt_obj(payload.get("delta"), "message_delta delta") or {}
            message.update(delta)  # stop_reason, stop_sequence (and e.g. container) are final values
            usage = _opt_obj(payload.get("usage"), "message_delta usage")
            if usage is not None:
                merged = dict(_opt_obj(message.get("usage"), "message usage") or {})
                # Null fields mean "not reported in this delta", as the Anthropic SDK treats them.
                merged.update({k: v for k, v in usage.items() if v is not None})
                message["usage"] = merged
        else:  # message_stop
            self._done = True

    def _start(self, message: dict[str, Any]) -> None:
        self._message = dict(message)
        content = self._message.get("content")
        self._blocks = {}
        if content is not None:
            for i, raw in enumerate(_list(content, "message_start content")):
                self._blocks[i] = _Block(base=dict(_obj(raw, "message_start content block")))

    def _block(self, payload: dict[str, Any]) -> _Block:
        index = _index(payload.get("index"), "content block index")
        block = self._blocks.get(index)
        if block is None:
            raise StreamError(f"messages stream referenced content block {index} before its start")
        return block

    @staticmethod
    def _delta(block: _Block, delta: dict[str, Any]) -> None:
        delta_type = delta.get("type")
        if delta_type == "input_json_delta":
            fragment = _opt_str(delta.get("partial_json"), "partial_json") or ""
            if block.partial_json is None:
                block.partial_json = []
            block.partial_json.append(fragment)
        elif delta_type == "citations_delta":
            if block.citations is None:
                block.citations = []
            block.citations.append(delta.get("citation"))
        elif isinstance(delta_type, str) and delta_type in _MESSAGES_TEXT_DELTAS:
            key = _MESSAGES_TEXT_DELTAS[delta_type]
            piece = _opt_str(delta.get(key), f"{delta_type} {key}")
            if piece:
                block.text.setdefault(key, []).append(piece)
        # Unknown delta types are skipped: newer API features must not break older sidecars.

    def _result(self) -> dict[str, Any]:
        if self._message is None or not self._done:
            raise StreamError("stream ended before message_stop")
        result = dict(self._message)
        result["content"] = [self._blocks[i].build() for i in sorted(self._blocks)]
        return result


_ASSEMBLERS: dict[str, type[_Base]] = {
    "chat": _ChatAssembler,
    "completions": _CompletionsAssembler,
    "responses": _ResponsesAssembler,
    "messages": _MessagesAssembler,
}


def assembler_for(kind: Kind, engine: Engine = "generic") -> Assembler:
    """A fresh assembler for one stream of the given API kind, its result in `engine`'s non-streaming
    answer shape (see :mod:`sidecar.answer_shapes`)."""
    try:
        cls = _ASSEMBLERS[kind]
    except KeyError:
        raise ValueError(f"unknown API kind {kind!r}") from None
    return cls(engine)
