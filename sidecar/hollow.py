"""Parse a request body without holding the event loop: long base64 runs stay in the body's buffer.

A body is mostly one thing by size: base64 image data. Parsed whole, a 25 MiB data URL holds the
loop ~35 ms in orjson (a C call no thread can interleave with: it keeps the GIL), and serialized
again for the engine ~15 ms more; a loop that stalls 50 ms per image body stalls every text
request and /healthz behind it. So a body of `HOLLOW_MIN_BODY` bytes or more is parsed hollow:

1. In a thread, numpy (which releases the GIL) finds every maximal run of at least `MIN_RUN`
   base64 characters (`A-Z a-z 0-9 + / =`) that is not made of number characters only.
2. Each run, less its first `KEEP` characters, is cut out and replaced by a marker, the JSON
   escape `\\u0000` + a per-request random nonce + the run's index + `\\u0000`. What is left, the
   skeleton, is small and is parsed by orjson on the loop as before.
3. A string of the tree that holds markers is the real string with those runs in the buffer:
   `Texts.view` gives the walker a `SpanText` of it, and `Texts.encode` serializes a tree for the
   engine as pieces, the skeleton's bytes with each marker replaced by its run, sent without a copy.

Why this is exact, not a heuristic:
- Inside a string, a run of base64 characters holds no quote, backslash, control or non-ASCII byte,
  so its bytes are its characters, and orjson writes those characters back as the same bytes: the
  pieces equal `orjson.dumps` of the tree parsed whole, byte for byte. `KEEP` characters stay
  before each marker, so a marker never follows a backslash that opens an escape (`\\uXXXX` is
  the longest, 5 characters after its backslash).
- Outside strings, valid JSON has no such run: its only tokens made of base64 characters are the
  literals (5 characters at most) and numbers (digits, `e`, `E`, `+`, excluded by rule 1), and two
  tokens are always separated by a character that is not one (whitespace, `,`, `:`, a bracket).
  A marker there puts a backslash outside a string, so the skeleton is invalid JSON exactly when
  the body was.
- The nonce is drawn per request and never shown, so a client cannot write a marker of its own.

What is left on the loop is the skeleton: `server.max_parse_bytes` bounds it (413 beyond), so the
loop's cost of any body is bounded whatever it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from preprocess.spans import SpanText, Text

from .errors import Cause, SidecarError

HOLLOW_MIN_BODY = 1 << 20  # smaller bodies parse in ~1.5 ms: hollowing would cost more than it saves
MIN_RUN = 1 << 16  # runs this long or longer leave the skeleton
KEEP = 8  # characters of each run kept before its marker (past any escape that ends just before it)
_BLOCK = 1 << 22  # bytes classified per numpy pass: bounds the temporary arrays to a few of these

Piece = bytes | memoryview
Buffer = bytes | bytearray | memoryview  # a received body


class _Classifier:
    """Per byte: is it a base64 character? Comparisons only (vectorized, GIL released), into
    buffers allocated once per body: fresh temporaries per pass would fault in new pages each time."""

    def __init__(self, size: int) -> None:
        self.work = np.empty(size, np.uint8)
        self.flags = np.empty(size, np.bool_)
        self.more = np.empty(size, np.bool_)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        n = len(a)
        work, flags, more = self.work[:n], self.flags[:n], self.more[:n]
        np.bitwise_or(a, np.uint8(0x20), out=work)  # A-Z onto a-z
        np.subtract(work, np.uint8(0x61), out=work)
        np.less(work, np.uint8(26), out=flags)
        np.subtract(a, np.uint8(0x2F), out=work)  # / and 0-9
        np.less(work, np.uint8(11), out=more)
        flags |= more
        np.equal(a, np.uint8(0x2B), out=more)  # +
        flags |= more
        np.equal(a, np.uint8(0x3D), out=more)  # =
        flags |= more
        return flags


def _numeric_only(a: np.ndarray) -> bool:
    """Could these bytes be part of a JSON number (digits, e, E, +)? Base64 data has a letter early:
    most runs are told apart by their first 4 KiB."""
    for part in (a[:4096], a[4096:]):
        digits = np.less(np.subtract(part, 0x30, dtype=np.uint8), 10)
        if not np.all(digits | ((part | 0x20) == 0x65) | (part == 0x2B)):
            return False
    return True


def _compiled_find_runs() -> Callable[[Buffer, int], list[tuple[int, int]]] | None:
    try:
        from ._scan import find_runs as compiled  # noqa: PLC0415 - compiled (setup.py), optional
    except ImportError:
        return None  # find_runs_numpy finds the same runs
    return compiled


_find_runs = _compiled_find_runs()


def find_runs(buf: Buffer, min_run: int = MIN_RUN) -> list[tuple[int, int]]:
    """The [start, end) of every maximal run of `min_run` or more base64 characters that could not
    be a number, in order. Call it in a thread: compiled (sidecar/_scan.c), one pass with the GIL
    released; else `find_runs_numpy`."""
    if _find_runs is not None:
        return _find_runs(buf, min_run)
    return find_runs_numpy(buf, min_run)


def find_runs_numpy(buf: Buffer, min_run: int = MIN_RUN) -> list[tuple[int, int]]:
    """`find_runs` in numpy: its passes release the GIL, the Python between them does not."""
    a = np.frombuffer(buf, np.uint8)
    window = max(1, min_run // 2)  # a run of min_run covers at least one whole aligned window
    limit = len(a) - len(a) % window
    step = max(window, _BLOCK - _BLOCK % window)
    is_base64 = _Classifier(min(max(step, window), max(len(a), 1)))
    full: list[int] = []  # indices of the aligned windows made of base64 characters only
    for lo in range(0, limit, step):
        flags = is_base64(a[lo : min(lo + step, limit)]).reshape(-1, window).all(axis=1)
        full.extend((lo // window + np.flatnonzero(flags)).tolist())
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(full):
        j = i
        while j + 1 < len(full) and full[j + 1] == full[j] + 1:
            j += 1
        start, end = full[i] * window, (full[j] + 1) * window
        # The run's true ends lie within the window on either side (a whole one would be in `full`).
        left = a[max(0, start - window) : start]
        bad = np.flatnonzero(~is_base64(left))
        start -= len(left) - (int(bad[-1]) + 1 if len(bad) else 0)
        right = a[end : end + window]
        bad = np.flatnonzero(~is_base64(right))
        end += int(bad[0]) if len(bad) else len(right)
        if end - start >= min_run and not _numeric_only(a[start:end]):
            runs.append((start, end))
        i = j + 1
    return runs


_MARKER = re.compile(rb"\\u0000([0-9a-f]{16})([0-9a-f]+)\\u0000")


@dataclass(slots=True)
class Texts:
    """One request's runs left in buffers, by marker; empty for a body parsed whole."""

    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    runs: list[tuple[Piece, ...]] = field(default_factory=list)

    def add(self, pieces: tuple[Piece, ...]) -> str:
        """Register ASCII base64 bytes (pieces, not copied) and return the marker that stands for them."""
        self.runs.append(pieces)
        return f"\x00{self.nonce}{len(self.runs) - 1:x}\x00"

    def view(self, text: str) -> Text:
        """`text` as its consumers should read it: itself, or a SpanText where it holds markers."""
        if not self.runs or "\x00" not in text:
            return text
        pieces: list[str | memoryview] = []
        pos = 0
        for match in _STR_MARKER.finditer(text):
            if match.group(1) != self.nonce:
                continue  # a client's own NUL characters that merely look like a marker
            pieces.append(text[pos : match.start()])
            pieces.extend(memoryview(p) for p in self.runs[int(match.group(2), 16)])
            pos = match.end()
        if pos == 0:
            return text
        pieces.append(text[pos:])
        return SpanText(tuple(pieces))

    def encode(self, tree: Any) -> bytes | tuple[Piece, ...]:
        """`tree` serialized for the engine: bytes, or pieces whose concatenation is the bytes
        `orjson.dumps` would give for the tree with every run put back."""
        raw = orjson.dumps(tree)
        if not self.runs:
            return raw
        needle = b"\\u0000" + self.nonce.encode()
        if needle not in raw:
            return raw
        pieces: list[Piece] = []
        view = memoryview(raw)
        pos = 0
        for match in _MARKER.finditer(raw):
            if match.group(1).decode() != self.nonce:
                continue
            pieces.append(view[pos : match.start()])
            pieces.extend(self.runs[int(match.group(2), 16)])
            pos = match.end()
        pieces.append(view[pos:])
        return tuple(p for p in pieces if len(p))


_STR_MARKER = re.compile("\x00([0-9a-f]{16})([0-9a-f]+)\x00")


def joined(body: bytes | tuple[Piece, ...]) -> bytes:
    """Pieces as one bytes (tests, logs): a copy."""
    return body if isinstance(body, bytes) else b"".join(body)


@dataclass(slots=True)
class Parsed:
    data: dict[str, Any]
    texts: Texts
    # What the request holds beyond its body's bytes, for the body budget: parsed whole, the tree
    # (the raw bytes are dropped, the serialization comes later): the body's size again; parsed
    # hollow, the buffer stays (its runs go upstream from it), and the tree and its serialization
    # are each about the skeleton's size.
    parsed_nbytes: int


def _loads(raw: Buffer) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SidecarError(Cause.BAD_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SidecarError(Cause.BAD_JSON, "request body must be a JSON object")
    return data


def _skeleton(buf: Buffer, runs: list[tuple[int, int]], texts: Texts) -> Iterator[Piece]:
    view = memoryview(buf)
    pos = 0
    for start, end in runs:
        cut = start + KEEP
        yield view[pos:cut]
        marker = texts.add((view[cut:end],))
        yield b"\\u0000" + marker[1:-1].encode() + b"\\u0000"
        pos = end
    yield view[pos:]


def _background() -> None:
    # Nice 19 for this thread only (Linux threads are tasks): on a CPU shared with the event loop,
    # the scheduler runs the loop first. Measured on the hostile mix: with the thread at the loop's
    # priority, the loop waited for the CPU in 93% of its 100 ms windows (30% at nice 19).
    # Not SCHED_IDLE, which cut that to 13%: this thread holds the GIL between its numpy calls, and
    # a SCHED_IDLE thread holding it on CPUs kept busy by normal tasks (the workers, an engine) gets
    # almost no CPU to reach its next release, while the loop waits for the GIL: a stall without end.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def background_executor(workers: int = 2) -> ThreadPoolExecutor:
    """Threads for `find_runs` and deep header probes, at nice 19 (one pool per app, shut down with it)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mm-hollow", initializer=_background)


async def parse_body(buf: Buffer, max_parse_bytes: int, executor: Executor | None = None) -> Parsed:
    """The body's tree, its runs left in `buf` (which must outlive the request's upstream send).

    `executor` runs the search for runs (`background_executor`; None: the loop's default)."""
    texts = Texts()
    if len(buf) < HOLLOW_MIN_BODY:
        if len(buf) > max_parse_bytes:
            raise _too_much(len(buf), max_parse_bytes)
        return Parsed(_loads(buf), texts, len(buf))
    runs = await asyncio.get_running_loop().run_in_executor(executor, find_runs, buf)
    if not runs:
        if len(buf) > max_parse_bytes:
            raise _too_much(len(buf), max_parse_bytes)
        return Parsed(_loads(buf), texts, len(buf))
    skeleton = b"".join(_skeleton(buf, runs, texts))
    if len(skeleton) > max_parse_bytes:
        raise _too_much(len(skeleton), max_parse_bytes)
    return Parsed(_loads(skeleton), texts, 2 * len(skeleton))


def _too_much(nbytes: int, limit: int) -> SidecarError:
    return SidecarError(
        Cause.BODY_TOO_COMPLEX,
        f"request body has {nbytes} bytes of JSON besides its base64 data, more than server.max_parse_bytes={limit}",
    )


__all__ = [
    "HOLLOW_MIN_BODY",
    "MIN_RUN",
    "Parsed",
    "Piece",
    "Texts",
    "background_executor",
    "find_runs",
    "joined",
    "parse_body",
]
