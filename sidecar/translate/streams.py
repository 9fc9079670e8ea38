"""Streams: a chat SSE stream translated event by event into an Anthropic Messages or Responses stream.

Streams never raise on what the engine sends: an in-band error, malformed JSON or a truncated stream
becomes the client API's ``error`` event, after which the translator is closed. So does a failure the
sidecar itself sees (the engine broke off or went silent): :meth:`StreamTranslator.fail`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from sidecar.assemble import unindexed_call_slot
from sidecar.errors import SidecarError
from sidecar.sse import SSEEvent

from .answers import ANTHROPIC_ERRORS_BY_STATUS, anthropic_error_type, engine_error
from .common import (
    JSON,
    _anthropic_stop,
    _anthropic_usage,
    _dict,
    _function_call_item,
    _int,
    _message_item,
    _response_object,
    _responses_status,
    _responses_usage,
    _with_prefix,
)


class StreamTranslator(Protocol):
    """Turns one chat SSE stream into another API's SSE frames, event by event."""

    def feed(self, event: SSEEvent) -> list[bytes]:
        """One parsed chat event in; zero or more encoded frames (``event: x\\ndata: {...}\\n\\n``) out."""
        ...

    def finish(self) -> list[bytes]:
        """The upstream stream ended: the frames that close the client's stream (an error if truncated)."""
        ...

    def fail(self, error: SidecarError) -> list[bytes]:
        """The sidecar ends the stream with its own error, in the client's grammar (nothing if already closed).

        An SSE error event of the chat form would be the wrong grammar for these clients: a Responses
        error event carries a ``sequence_number``, an Anthropic one the Anthropic error object.
        """
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


class _ChatStream:
    """Reads the chat chunk grammar; subclasses write the client's.

    The client grammars want one content block (or output item) open at a time, so this tracks which one
    is open: ``"text"``, a tool call's chat index, or None. Only choice 0 is read (see answers._first_choice).
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
            return self._abort(engine_error(payload if payload is not None else data))
        if not isinstance(payload, dict):
            return self._abort({"message": "upstream stream chunk is not a JSON object"})
        # vLLM and SGLang report failures mid-stream as `{"error": {...}}`; some servers flatten it.
        if payload.get("error") is not None or payload.get("object") == "error":
            return self._abort(engine_error(payload))
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

    def fail(self, error: SidecarError) -> list[bytes]:
        if self._closed:
            return []
        self._closed = True
        return self._own_error(error)

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
            new_id = fragment.get("id")
            index = unindexed_call_slot(self._calls, new_id if isinstance(new_id, str) else None)
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

    def _own_error(self, error: SidecarError) -> list[bytes]:
        raise NotImplementedError


# ---- chat stream -> Anthropic Messages stream

_ANTHROPIC_ERROR_TYPES = frozenset(ANTHROPIC_ERRORS_BY_STATUS.values())


def _anthropic_error(error: JSON) -> JSON:
    # vLLM puts the HTTP status in `code` and a Python class name in `type`: a status decides, as it
    # does for a whole error answer; without one, a type that is already Anthropic's is kept.
    status = _int(error.get("code"))
    if 400 <= status < 600:
        kind = anthropic_error_type(status)
    else:
        kind = error["type"] if error.get("type") in _ANTHROPIC_ERROR_TYPES else "api_error"
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

    def _own_error(self, error: SidecarError) -> list[bytes]:
        payload = {"type": "error", "error": {"type": error.cause.value.anthropic_type, "message": error.message}}
        return [_frame("error", payload)]


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

    def _own_error(self, error: SidecarError) -> list[bytes]:
        return [self._emit("error", code=error.cause.code, message=error.message, param=error.param)]


def chat_stream_to_responses(request: JSON, response_id: str) -> StreamTranslator:
    """A translator of one chat stream into a Responses stream answering ``request``.

    ``response_id`` gets a ``resp_`` prefix unless it has one; ``request`` is the client's Responses request,
    whose settings the response object echoes.
    """
    return _ResponsesStream(request, response_id)
