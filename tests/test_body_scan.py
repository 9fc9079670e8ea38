"""sidecar/_scan.c (via sidecar/bodies.py's _Structure): the one-pass count and copy of arriving body chunks.

The compiled pass and the numpy fallback give the same counts and the same copied bytes on random
chunks of every length around the 32-byte vector width, JSON-heavy or not; a chunk that would not
fit its buffer is refused without writing. The limits' answers over HTTP are tests/test_trust_boundary.py's.
"""

from __future__ import annotations

import numpy as np
import pytest

from sidecar import bodies
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
