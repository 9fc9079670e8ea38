"""sidecar/_scan.c: the one-pass count and copy of arriving body chunks (sidecar/bodies.py's _Structure)
and the one-pass search for long base64 runs (sidecar/hollow.py's find_runs).

The compiled passes and the numpy fallbacks give the same counts, copied bytes and runs on random
inputs of every length around the 32-byte vector width, JSON-heavy or not; a chunk that would not fit
its buffer is refused without writing. The limits' answers over HTTP are tests/test_trust_boundary.py's,
hollow parsing's tests/test_hollow.py's.
"""

from __future__ import annotations

import numpy as np
import pytest

from sidecar import bodies, hollow
from sidecar.bodies import JsonBounds, _Structure
from sidecar.errors import SidecarError

try:
    from sidecar import _scan
except ImportError:  # not built: the compiled half is skipped, the numpy half still runs
    _scan = None

needs_scan = pytest.mark.skipif(_scan is None, reason="sidecar._scan is not built")


def chunks(seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b'{},[]:"abc 0123\\', np.uint8)
    out = [b"", b"{", b",[", bytes(range(256))]
    for n in [*range(70), 1000, 4096 + 31, 1 << 16]:
        out.append(rng.choice(alphabet, n).tobytes())  # JSON-ish
        out.append(rng.integers(0, 256, n, dtype=np.uint8).tobytes())  # anything
    return out


def expected(chunk: bytes) -> tuple[int, int]:
    return chunk.count(b"{"), chunk.count(b",") + chunk.count(b"[")


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_scan), False], ids=["compiled", "numpy"])
def test_counts_and_copies_like_bytes_count(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(bodies, "_copy_count", None)
    data = chunks(11)
    structure = _Structure(JsonBounds(max_objects=1 << 40, max_items=1 << 40))
    buf = np.full(sum(len(c) for c in data) + 5, 0xEE, np.uint8)
    offset = 0
    for chunk in data:
        before = structure.objects, structure.items
        structure.feed(chunk, buf, offset)
        objects, items = expected(chunk)
        assert (structure.objects - before[0], structure.items - before[1]) == (objects, items)
        offset += len(chunk)
    assert buf[:offset].tobytes() == b"".join(data)
    assert (buf[offset:] == 0xEE).all()  # nothing past the chunks
    count_only = _Structure(JsonBounds(max_objects=1 << 40, max_items=1 << 40))
    for chunk in data:
        count_only.feed(chunk)
    assert (count_only.objects, count_only.items) == (structure.objects, structure.items)


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_scan), False], ids=["compiled", "numpy"])
def test_the_limits_are_crossed_at_the_same_chunk(compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not compiled:
        monkeypatch.setattr(bodies, "_copy_count", None)
    structure = _Structure(JsonBounds(max_objects=100, max_items=1000))
    structure.feed(b"{" * 60)
    with pytest.raises(SidecarError, match=r"limits\.max_json_objects=100"):
        structure.feed(b'{"a":' * 41)
    items = _Structure(JsonBounds(max_objects=100, max_items=10))
    with pytest.raises(SidecarError, match=r"limits\.max_json_items=10 JSON values"):
        items.feed(b"[1,2,3,4,5,6,7,8,9,10,11]")


@needs_scan
def test_a_chunk_that_does_not_fit_is_refused_without_writing() -> None:
    assert _scan is not None
    buf = np.zeros(40, np.uint8)
    for offset in (-1, 9, 41):
        with pytest.raises(ValueError, match="does not fit a 40-byte buffer"):
            _scan.copy_count(b"{" * 32, buf, offset)
    with pytest.raises(BufferError, match="not writable"):
        _scan.copy_count(b"{", b"read-only", 0)
    assert not buf.any()
    assert _scan.copy_count(b"{,[" * 13, buf, 1) == (13, 26)  # 39 bytes at 1: exactly the rest
    assert _scan.copy_count(b"{,[" * 20, None, 0) == (20, 40)


@needs_scan
def test_find_runs_compiled_equals_numpy_on_random_bodies() -> None:
    """sidecar/_scan.c's find_runs against hollow.find_runs_numpy: base64 stretches, number-only
    stretches, JSON punctuation and arbitrary bytes, every min_run from 1 up (the <= 32 and > 32
    branches), lengths around the 32-byte block."""
    rng = np.random.default_rng(15)
    base64 = np.frombuffer(b"ABCxyz019+/=", np.uint8)
    number = np.frombuffer(b"0123456789eE+", np.uint8)
    punctuation = np.frombuffer(b'ABCxyz019+/=eE"{},: \\', np.uint8)
    for trial in range(600):
        n = int(rng.integers(0, 4000))
        min_run = int(rng.integers(1, 70)) if trial % 2 else int(rng.integers(1, 300))
        parts: list[bytes] = []
        while sum(map(len, parts)) < n:
            kind, length = int(rng.integers(0, 4)), int(rng.integers(0, 400))
            if kind == 0:
                parts.append(rng.choice(base64, length).tobytes())
            elif kind == 1:
                parts.append(rng.choice(number, length).tobytes())
            elif kind == 2:
                parts.append(rng.choice(punctuation, length % 5).tobytes())
            else:
                parts.append(rng.integers(0, 256, length % 7, dtype=np.uint8).tobytes())
        body = b"".join(parts)[:n]
        assert hollow.find_runs(body, min_run) == hollow.find_runs_numpy(body, min_run), (trial, n, min_run)
    assert hollow.find_runs(b"A" * 64, 64) == [(0, 64)]  # a run reaching the end, n a multiple of 32
    assert hollow.find_runs(b"1" * 64, 64) == []  # digits only: could be a number
    with pytest.raises(ValueError, match="min_run 0"):
        _scan.find_runs(b"A", 0)
