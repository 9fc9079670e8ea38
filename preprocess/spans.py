"""ASCII text that stays where it arrived: a request body's buffer (`SpanText`).

A 25 MiB data URL parsed into a Python str costs the event loop ~35 ms (orjson) and the str a
copy; serialized again for the engine, ~15 ms more. The sidecar instead leaves long base64 runs in
the body's buffer (sidecar/hollow.py) and hands the code that reads images this view, which does
what that code needs from a base64 text (its length, its end, a prefix to probe, its bytes for a
worker) without ever building the whole str. Every piece is ASCII by construction: the hollowing
only cuts runs of base64 characters.
"""

from __future__ import annotations

from collections.abc import Iterator


class SpanText:
    """An immutable ASCII text made of str pieces and buffer pieces (memoryviews of bytes)."""

    __slots__ = ("_len", "_pieces")

    def __init__(self, pieces: tuple[str | memoryview, ...]) -> None:
        self._pieces = tuple(p for p in pieces if len(p))
        self._len = sum(len(p) for p in self._pieces)

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __repr__(self) -> str:
        return f"SpanText({self._len} chars)"

    def __getitem__(self, index: slice) -> str:
        """The text of a slice, built from just the pieces it covers (prefixes and ends stay cheap)."""
        start, stop, step = index.indices(self._len)
        if step != 1:
            raise ValueError("SpanText slices take no step")
        out: list[str] = []
        offset = 0
        for piece in self._pieces:
            end = offset + len(piece)
            if end > start and offset < stop:
                lo, hi = max(start - offset, 0), min(stop, end) - offset
                chunk = piece[lo:hi]
                out.append(chunk if isinstance(chunk, str) else chunk.tobytes().decode("ascii"))
            offset = end
            if offset >= stop:
                break
        return "".join(out)

    def tail(self, start: int) -> SpanText:
        """The text from `start` on, as a view (no copy of the buffer pieces)."""
        pieces: list[str | memoryview] = []
        offset = 0
        for piece in self._pieces:
            end = offset + len(piece)
            if end > start:
                pieces.append(piece[max(start - offset, 0) :])
            offset = end
        return SpanText(tuple(pieces))

    def endswith(self, suffix: str) -> bool:
        return len(suffix) <= self._len and self[self._len - len(suffix) :] == suffix

    def isascii(self) -> bool:
        return all(p.isascii() for p in self._pieces if isinstance(p, str))

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The text as ASCII bytes, piece by piece (buffer pieces as they are: no copy)."""
        for piece in self._pieces:
            yield piece.encode("ascii") if isinstance(piece, str) else piece

    def text(self) -> str:
        """The whole text as one str: a full copy, for the rare consumer that needs one."""
        return self[:]


Text = str | SpanText  # what a base64 payload may be: parsed into a str, or left in the body's buffer
