"""Incremental Server-Sent-Events parser.

This module owns the framing of ``text/event-stream`` bodies read from the upstream engine: turning
arbitrary byte chunks (as they come off the socket) into complete :class:`SSEEvent` objects, following
the WHATWG event-stream interpretation rules. It knows nothing about what the events mean; that is
:mod:`sidecar.assemble`'s job.

Only the ``event`` and ``data`` fields are surfaced. ``id`` and ``retry`` are parsed and dropped: the
sidecar never reconnects an upstream stream, so reconnection state has no consumer.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEError", "SSEEvent", "SSEParser"]

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

# One regex pass finds every line terminator; "\r\n" is listed first so it wins over a lone "\r".
_EOL = re.compile(r"\r\n|\r|\n")


class SSEError(ValueError):
    """The upstream event stream cannot be parsed within the configured limits."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event. ``event`` is None when the stream gave no (or an empty) event type."""

    event: str | None
    data: str


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on CPython's compact strings, so the common case costs nothing extra.
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class SSEParser:
    """Push parser: ``feed()`` bytes as they arrive, ``close()`` at end of stream.

    Memory is bounded by ``max_event_bytes``: the unterminated line plus the data accumulated for the
    event being built (counted in UTF-8 bytes) may not exceed it, otherwise :class:`SSEError` is
    raised. After an :class:`SSEError` the parser is dead: ``feed()`` raises again and ``close()``
    returns nothing.
    """

    __slots__ = (
        "_bom_checked",
        "_closed",
        "_data",
        "_data_size",
        "_decoder",
        "_event",
        "_failed",
        "_line_parts",
        "_line_size",
        "_max",
        "_skip_lf",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._max = max_event_bytes
        # Incremental decoding keeps a multi-byte character split across chunks intact. Invalid bytes
        # become U+FFFD rather than errors, as the SSE spec prescribes.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Pieces of the current, not yet terminated line. Kept as a list so that a long line trickling
        # in over many small chunks is joined once, not re-concatenated per chunk.
        self._line_parts: list[str] = []
        self._line_size = 0
        self._data: list[str] = []
        self._data_size = 0
        self._event: str | None = None
        # Set when a chunk ended in "\r": a "\n" at the start of the next chunk belongs to that same
        # terminator and must not produce an extra (blank, event-dispatching) line.
        self._skip_lf = False
        self._bom_checked = False
        self._closed = False
        self._failed = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume the next chunk of the body; return the events it completed, in order."""
        if self._closed:
            raise RuntimeError("SSEParser.feed() called after close()")
        if self._failed:
            raise SSEError("SSE parser already failed")
        return self._consume(self._decoder.decode(chunk))

    def close(self) -> list[SSEEvent]:
        """End of stream: flush a trailing line and an event not followed by a blank line.

        The spec says to discard such an event; we keep it because a truncated-but-complete final
        event from a sloppy upstream is more useful to the caller than silence, and the assembler
        decides separately whether the stream as a whole was complete. Idempotent.
        """
        if self._closed or self._failed:
            self._closed = True
            return []
        self._closed = True
        events = self._consume(self._decoder.decode(b"", final=True))
        if self._line_parts:
            line = "".join(self._line_parts)
            self._line_parts.clear()
            self._line_size = 0
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _consume(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if not self._bom_checked:
            # The spec allows one leading byte-order mark on the stream; it is not part of a field.
            self._bom_checked = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        events: list[SSEEvent] = []
        pos = 0
        end = len(text)
        for match in _EOL.finditer(text):
            piece = text[pos : match.start()]
            if self._line_parts:
                self._line_parts.append(piece)
                line = "".join(self._line_parts)
                self._line_parts.clear()
                self._line_size = 0
            else:
                line = piece
            if match.end() == end and match.group() == "\r":
                self._skip_lf = True
            pos = match.end()
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        if pos < end:
            rest = text[pos:]
            self._line_parts.append(rest)
            self._line_size += _utf8_len(rest)
            self._check_size()
        return events

    def _process_line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None  # comment; engines use these as keep-alives
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            # +1 for the "\n" that joins this line to the next one.
            self._data_size += _utf8_len(value) + 1
            self._check_size()
        elif name == "event":
            self._event = value or None
        # "id", "retry" and unknown fields are ignored (see module docstring).
        return None

    def _dispatch(self) -> SSEEvent | None:
        event_type = self._event
        self._event = None
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        self._data_size = 0
        return SSEEvent(event=event_type, data=data)

    def _check_size(self) -> None:
        if self._line_size + self._data_size > self._max:
            self._failed = True
            raise SSEError(f"SSE event exceeds {self._max} bytes")
