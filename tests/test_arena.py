"""Tests for preprocess.arena and preprocess.protocol: allocator invariants, round trips through another
process, stale and malformed descriptors, segment lifecycle and stale-segment cleanup, running out of space."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import pickle
import shutil
import stat
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess import arena as arena_mod
from preprocess.arena import (
    Arena,
    ArenaError,
    find_stale,
    segment_name,
    unlink_stale,
)
from preprocess.extents import Extent, pack_tensors, reservation_size
from preprocess.protocol import (
    DESCRIPTOR_ERROR,
    PAGE,
    STATE_FREE,
    STATE_READY,
    STATE_WRITING,
    TENSOR_ALIGN,
    ArenaReader,
    DescriptorError,
    StaleDescriptor,
    TensorDescriptor,
)

SPAWN = multiprocessing.get_context("spawn")
MiB = 1 << 20


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    a = Arena.create(segment_name("test"), 4 * MiB, directory=str(tmp_path))
    yield a
    a.close()


def _published(a: Arena, array: np.ndarray[Any, Any], **kw: Any) -> tuple[Extent, TensorDescriptor]:
    ext = a.reserve(array.nbytes)
    assert ext is not None
    desc = a.write(ext, 0, array, **kw)
    a.publish(ext)
    return ext, desc


@contextlib.contextmanager
def refused(
    fragment: str, kind: type[DescriptorError] = DescriptorError
) -> Iterator[pytest.ExceptionInfo[DescriptorError]]:
    """Expect a `kind` whose str() is the fixed message and whose detail names the cause."""
    with pytest.raises(kind) as info:
        yield info
    assert str(info.value) == DESCRIPTOR_ERROR
    assert fragment in info.value.detail, info.value.detail


def _bf16_bits(n: int) -> np.ndarray[Any, Any]:
    import torch

    return torch.randn(n, 5, dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


# --------------------------------------------------------------------------- spawn children (module level)


def _read_in_child(directory: str, descs: list[dict[str, Any]]) -> list[tuple[str, bytes, bytes, bytes]]:
    """Runs in a spawned process: read each descriptor three ways and return the raw bytes."""
    import torch

    out = []
    with ArenaReader(directory) as reader:
        for obj in descs:
            desc = TensorDescriptor.from_json(obj)
            view = reader.view(desc)
            assert not view.flags.writeable
            tensor = reader.tensor(desc)
            copied = reader.copy_out(desc)
            out.append(
                (
                    str(tensor.dtype),
                    view.tobytes(),
                    tensor.flatten().view(torch.uint8).numpy().tobytes(),
                    copied.flatten().view(torch.uint8).numpy().tobytes(),
                )
            )
            del view, tensor  # before close(): the reader refuses to outlive views silently
    return out


def _create_and_return(directory: str, name: str) -> None:
    """A child that creates a segment and exits normally without closing it."""
    Arena.create(name, 64 * 1024, directory=directory)


def _create_and_die(directory: str, name: str) -> None:
    """A child that creates a segment and dies without any cleanup running."""
    Arena.create(name, 64 * 1024, directory=directory)
    os._exit(0)


def _run_child(target: Any, *args: Any) -> int:
    proc = SPAWN.Process(target=target, args=args)
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert proc.pid is not None
    return proc.pid


# --------------------------------------------------------------------------- allocator


# Sizes cluster around page boundaries, where off-by-one errors in the allocator would hide.
_SIZES = st.one_of(
    st.integers(0, 6 * PAGE),
    st.builds(lambda pages, delta: max(0, pages * PAGE + delta), st.integers(0, 6), st.integers(-1, 1)),
)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), _SIZES),
        st.tuples(st.just("free"), st.integers(0, 63)),
        st.tuples(st.just("publish"), st.integers(0, 63)),
    ),
    min_size=10,
    max_size=80,
)


def _check_invariants(a: Arena) -> None:
    head = a.header
    runs = [(e.offset, e.capacity, "live") for e in a.live_extents()]
    runs += [(start, length, "free") for start, length in a.free_runs()]
    runs.sort()
    # Live extents and free runs tile the data area exactly: no overlap, no gap, nothing outside.
    cursor = head.data_offset
    for start, length, _ in runs:
        assert start == cursor and length > 0 and length % PAGE == 0
        cursor += length
    assert cursor == head.data_end
    # Free runs are coalesced: no two are neighbours.
    free = a.free_runs()
    assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in itertools.pairwise(free))
    table = np.frombuffer(Path(a.path).read_bytes(), "<u8", count=head.pages, offset=head.table_offset)
    for e in a.live_extents():
        assert (e.offset - head.data_offset) % PAGE == 0
        pages = table[(e.offset - head.data_offset) // PAGE :][: e.capacity // PAGE]
        assert set((pages >> 2).tolist()) == {e.generation}
        assert set((pages & 3).tolist()) <= {STATE_WRITING, STATE_READY}
    for start, length in free:
        pages = table[(start - head.data_offset) // PAGE :][: length // PAGE]
        assert set((pages & 3).tolist()) <= {STATE_FREE}
    stats = a.stats()
    assert stats.reserved_bytes + stats.free_bytes == stats.capacity == a.capacity
    assert stats.extents == len(a.live_extents())


@settings(max_examples=200, deadline=None)
@given(ops=_OPS)
def test_any_reserve_free_sequence_keeps_extents_disjoint_aligned_and_coalesces(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        # 24 data pages: small enough that runs of every length, and a full arena, come up often.
        a = Arena.create("mm-sidecar-prop-1", 26 * PAGE, directory=d, pretouch=False)
        try:
            last_generation = 0
            published: set[Extent] = set()
            for op, arg in ops:
                live = a.live_extents()
                if op == "reserve":
                    largest = a.stats().largest_free
                    ext = a.reserve(arg)
                    if ext is None:
                        assert largest < reservation_size(arg)
                    else:
                        assert ext.capacity == reservation_size(arg)
                        assert ext.generation > last_generation
                        last_generation = ext.generation
                elif live and op == "free":
                    a.free(live[arg % len(live)])
                elif live and live[arg % len(live)] not in published:
                    a.publish(live[arg % len(live)])
                    published.add(live[arg % len(live)])
                _check_invariants(a)
            for ext in a.live_extents():
                a.free(ext)
            a.leak_check()
            assert a.free_runs() == ((a.header.data_offset, a.capacity),)
            assert a.stats().fragmentation == 0.0
        finally:
            a.close()


def test_best_fit_keeps_the_long_run_and_free_coalesces_both_sides(arena: Arena) -> None:
    a, b, c, d = (arena.reserve(n * PAGE) for n in (1, 2, 1, 1))
    assert a and b and c and d
    arena.free(a)
    arena.free(c)
    # Two one-page holes and the long tail: a one-page request takes a hole, not the tail.
    small = arena.reserve(100)
    assert small is not None and small.offset in (a.offset, c.offset)
    arena.free(small)
    # A two-page request fits neither one-page hole.
    pair = arena.reserve(PAGE + 1)
    assert pair is not None and pair.offset > d.offset
    arena.free(pair)
    arena.free(b)  # merges with both neighbouring holes
    assert arena.free_runs()[0] == (a.offset, 4 * PAGE)
    arena.free(d)
    assert arena.free_runs() == ((arena.header.data_offset, arena.capacity),)
    arena.leak_check()


def test_stats_fragmentation_and_leak_check(arena: Arena) -> None:
    exts = [arena.reserve(PAGE) for _ in range(4)]
    assert all(exts)
    arena.free(exts[1])  # type: ignore[arg-type]
    stats = arena.stats()
    assert stats.extents == 3 and stats.reserved_bytes == 3 * PAGE
    assert stats.fragmentation == pytest.approx(1 - stats.largest_free / stats.free_bytes)
    assert stats.fragmentation > 0
    with pytest.raises(ArenaError, match="3 extents still reserved"):
        arena.leak_check()
    for e in (exts[0], exts[2], exts[3]):
        arena.free(e)  # type: ignore[arg-type]
    arena.leak_check()
    assert arena.reserve(arena.capacity + 1) is None
    whole = arena.reserve(arena.capacity)  # an exact fit of the whole data area
    assert whole is not None and arena.stats().free_bytes == 0 and arena.stats().fragmentation == 0.0
    assert arena.reserve(0) is None
    arena.free(whole)


def test_reservation_size_and_pack_tensors_account_exactly() -> None:
    assert reservation_size(0) == PAGE
    assert reservation_size(1) == PAGE
    assert reservation_size(PAGE) == PAGE
    assert reservation_size(PAGE + 1) == 2 * PAGE
    offsets, total = pack_tensors([4888 * 1176 * 4, 24, 24])
    assert offsets == (0, 4888 * 1176 * 4, 4888 * 1176 * 4 + TENSOR_ALIGN)
    assert total == offsets[-1] + 24
    with pytest.raises(ValueError, match=">= 0"):
        reservation_size(-1)


def test_extent_pickles_for_workers(arena: Arena) -> None:
    ext = arena.reserve(10)
    assert ext is not None
    assert pickle.loads(pickle.dumps(ext)) == ext
    with pytest.raises(dataclasses.FrozenInstanceError):
        ext.generation = 99  # type: ignore[misc]


# --------------------------------------------------------------------------- writes and their rules


def test_double_free_foreign_and_stale_extent_handles_raise(arena: Arena, tmp_path: Path) -> None:
    ext = arena.reserve(10)
    assert ext is not None
    arena.free(ext)
    with pytest.raises(ArenaError, match="not reserved"):
        arena.free(ext)
    again = arena.reserve(10)
    assert again is not None and again.offset == ext.offset
    with pytest.raises(ArenaError, match="stale"):
        arena.free(ext)  # the old handle must not free the new reservation
    with pytest.raises(ArenaError, match="belongs to arena"):
        arena.free(dataclasses.replace(again, shm="someone-else"))
    with pytest.raises(ArenaError, match="not a page run"):
        arena.free(dataclasses.replace(again, offset=again.offset + 64))
    arena.free(again)


def test_write_rules(arena: Arena) -> None:
    ext = arena.reserve(2 * PAGE)
    assert ext is not None
    with pytest.raises(ValueError, match="multiple of 64"):
        arena.write(ext, 8, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        arena.write(ext, 0, np.zeros(2 * PAGE + 1, np.uint8))
    with pytest.raises(ValueError, match="not one of"):
        arena.write(ext, 0, np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="uint16 bit patterns"):
        arena.write(ext, 0, np.zeros(4, np.float32), dtype="bfloat16")
    # Non-contiguous and byte-swapped inputs are copied into the C-contiguous little-endian layout.
    src = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    desc = arena.write(ext, 64, src)
    assert (desc.dtype, desc.shape, desc.offset) == ("int32", (4, 3), ext.offset + 64)
    arena.publish(ext)
    with pytest.raises(ArenaError, match="no longer writable"):
        arena.write(ext, 0, np.zeros(4, np.uint8))
    with pytest.raises(ArenaError, match="already published"):
        arena.publish(ext)
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        assert (reader.view(desc) == src).all()
    arena.free(ext)
    with pytest.raises(ArenaError, match="not reserved"):
        arena.write(ext, 0, np.zeros(4, np.uint8))


def test_worker_attach_writes_owner_publishes(arena: Arena) -> None:
    directory = os.path.dirname(arena.path)
    ext = arena.reserve(3 * 4 * 1000)
    assert ext is not None
    worker = Arena.attach(arena.name, directory)
    try:
        with pytest.raises(ArenaError, match="only the process that created"):
            worker.reserve(10)
        with pytest.raises(ArenaError, match="only the process that created"):
            worker.free(ext)
        view = worker.ndarray_view(ext, 0, "float32", (3, 1000))
        view[...] = np.arange(3000, dtype=np.float32).reshape(3, 1000)
        del view
        desc = worker.descriptor(ext, 0, "float32", (3, 1000))
    finally:
        worker.close()
    assert os.path.exists(arena.path)  # a worker never unlinks
    with ArenaReader(directory) as reader:
        with refused("not published yet") as info:
            reader.view(desc)
        assert not isinstance(info.value, StaleDescriptor)
        arena.publish(ext)
        assert (reader.view(desc).ravel() == np.arange(3000)).all()
    arena.free(ext)


# --------------------------------------------------------------------------- reading


def test_round_trip_bit_identical_in_a_spawned_process(arena: Arena) -> None:
    rng = np.random.default_rng(0)
    pixel_values = rng.standard_normal((257, 1176), dtype=np.float32)
    pixel_values[0, :4] = [np.nan, np.inf, -0.0, 1e-45]  # bit patterns, not just values
    grid = np.array([[1, 34, 60], [1, 20, 20]], dtype=np.int64)
    bf16 = _bf16_bits(33)
    flags = rng.integers(0, 2, 17).astype(bool)

    # One request's tensors share one extent at aligned offsets; another gets its own.
    offsets, total = pack_tensors([pixel_values.nbytes, grid.nbytes])
    ext = arena.reserve(total)
    assert ext is not None
    descs = [arena.write(ext, offsets[0], pixel_values), arena.write(ext, offsets[1], grid)]
    arena.publish(ext, total)
    for array, kw in ((bf16, {"dtype": "bfloat16"}), (flags, {}), (np.zeros((0, 3), np.float16), {})):
        descs.append(_published(arena, array, **kw)[1])

    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        results = pool.submit(_read_in_child, os.path.dirname(arena.path), [d.to_json() for d in descs]).result(60)

    originals: list[np.ndarray[Any, Any]] = [pixel_values, grid, bf16, flags, np.zeros((0, 3), np.float16)]
    dtypes = ["torch.float32", "torch.int64", "torch.bfloat16", "torch.bool", "torch.float16"]
    for original, dtype, (got_dtype, view_bytes, tensor_bytes, copy_bytes) in zip(
        originals, dtypes, results, strict=True
    ):
        assert got_dtype == dtype
        assert view_bytes == tensor_bytes == copy_bytes == original.tobytes()


def test_freed_and_reused_extent_makes_the_descriptor_stale(arena: Arena) -> None:
    ext, desc = _published(arena, np.arange(100, dtype=np.int64))
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        copy = reader.copy_out(desc)
        arena.free(ext)
        with refused("the extent was freed or reused", StaleDescriptor):
            reader.view(desc)
        again = arena.reserve(8)
        assert again is not None and again.offset == ext.offset and again.generation != ext.generation
        arena.write(again, 0, np.full(100, 7, np.int64))
        arena.publish(again)
        for read in (reader.view, reader.tensor, reader.copy_out, reader.validate):
            with refused("the extent was freed or reused", StaleDescriptor):
                read(desc)
        # A reservation that starts earlier and covers the old extent's pages is just as visible.
        arena.free(again)
        before = arena.reserve(8)
        assert before is not None
        wide = arena.reserve(3 * PAGE)
        assert wide is not None
        with refused("the extent was freed or reused", StaleDescriptor):
            reader.view(desc)
        assert copy.tolist() == list(range(100))  # the copy taken before the ack is unaffected
        arena.free(before)
        arena.free(wide)


def test_copy_out_detects_reuse_while_copying(arena: Arena) -> None:
    import torch

    ext, desc = _published(arena, np.ones(1000, np.float32))

    class SlowEngine(ArenaReader):
        """The sidecar times out the ack and reuses the extent while this rank is still copying."""

        def _copy(self, src: torch.Tensor, device: str | torch.device) -> torch.Tensor:
            out = super()._copy(src, device)
            arena.free(ext)
            assert arena.reserve(8) is not None
            return out

    with SlowEngine(os.path.dirname(arena.path)) as reader, refused("changed while it was copied", StaleDescriptor):
        reader.copy_out(desc)
    for e in arena.live_extents():
        arena.free(e)


def test_publish_with_used_bytes_keeps_the_rest_unreadable(arena: Arena) -> None:
    ext = arena.reserve(3 * PAGE)
    assert ext is not None
    inside = arena.write(ext, 0, np.ones(100, np.uint8))
    beyond = arena.descriptor(ext, 2 * PAGE, "uint8", (100,))
    arena.publish(ext, 100)
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        assert reader.view(inside).sum() == 100
        with refused("not published yet"):
            reader.view(beyond)
    arena.free(ext)


def _mutations(
    good: TensorDescriptor, key: bytes, data_offset: int, data_end: int
) -> list[tuple[str, TensorDescriptor, str]]:
    """Bad descriptors and the cause each must be refused for. Those the static checks cannot see are
    signed with the segment's key, so that the reader's own bounds checks, not the MAC, refuse them."""
    r = dataclasses.replace
    return [
        ("negative offset", r(good, offset=-64), "descriptor.offset"),
        ("wrong nbytes", r(good, nbytes=good.nbytes - 4), "descriptor.nbytes"),
        ("bad dtype", r(good, dtype="float64"), "descriptor.dtype"),
        ("object dtype", r(good, dtype="object"), "descriptor.dtype"),
        ("negative dim", r(good, shape=(-1, 25), nbytes=100), "descriptor.shape"),
        ("path traversal", r(good, shm="../../etc/passwd"), "descriptor.shm"),
        ("slash in name", r(good, shm="mm-sidecar-a/b"), "descriptor.shm"),
        ("zero generation", r(good, generation=0), "descriptor.generation"),
        ("not hex", r(good, mac="g" * 64), "descriptor.mac"),
        ("out of bounds", r(good, offset=data_end - 64).signed(key), "outside the data area"),
        ("past the end", r(good, offset=data_end + PAGE).signed(key), "outside the data area"),
        ("in the header", r(good, offset=0).signed(key), "outside the data area"),
        ("in the table", r(good, offset=data_offset - PAGE).signed(key), "outside the data area"),
        ("misaligned", r(good, offset=good.offset + 4).signed(key), "is not a multiple of 64"),
        ("moved, not signed", r(good, offset=good.offset + 64), "MAC does not verify"),
    ]


def test_bad_descriptors_raise_before_anything_is_read(arena: Arena) -> None:
    _, good = _published(arena, np.ones((4, 25), np.float32))
    head = arena.header
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        for label, bad, cause in _mutations(good, head.key, head.data_offset, head.data_end):
            fresh = ArenaReader(os.path.dirname(arena.path))
            with refused(cause) as info:
                fresh.view(bad)
            assert not isinstance(info.value, StaleDescriptor), label
            fresh.close()
            with refused(cause):
                reader.tensor(bad)
        with refused("does not exist", StaleDescriptor):
            reader.view(dataclasses.replace(good, shm="mm-sidecar-nobody-1"))
        assert reader.view(good).sum() == 100


def test_static_checks_do_not_even_attach(tmp_path: Path) -> None:
    reader = ArenaReader(str(tmp_path))
    bad = TensorDescriptor("mm-sidecar-x-1", 4096, 12, "float32", (4,), 1, "0" * 64)  # 4 x 4 != 12
    with refused("descriptor.nbytes"):
        reader.view(bad)
    assert reader.segments == ()


def test_symlink_and_foreign_files_are_refused(arena: Arena, tmp_path: Path) -> None:
    _, good = _published(arena, np.ones(16, np.float32))
    os.symlink(arena.path, tmp_path / "mm-sidecar-link-1")
    junk = tmp_path / "mm-sidecar-junk-1"
    junk.write_bytes(b"SECRETS!" + b"\0" * (3 * PAGE - 8))
    junk.chmod(0o600)
    with ArenaReader(str(tmp_path)) as reader:
        # Seen by the lstat, before any open (O_NOFOLLOW covers one planted between the two).
        with refused("not a regular file"):
            reader.view(dataclasses.replace(good, shm="mm-sidecar-link-1"))
        with refused("not an mm-sidecar arena") as info:
            reader.view(dataclasses.replace(good, shm=junk.name))
        # Another file's bytes reach neither the message nor the log.
        assert "SECRETS" not in str(info.value) + info.value.detail + repr(info.value)
        junk.chmod(0o644)
        with refused("open to other users"):
            reader.view(dataclasses.replace(good, shm=junk.name))


def test_reader_follows_a_segment_replaced_by_a_restarted_sidecar(tmp_path: Path) -> None:
    first = Arena.create("mm-sidecar-r-1", 1 * MiB, directory=str(tmp_path))
    _, desc = _published(first, np.ones(16, np.float32))
    reader = ArenaReader(str(tmp_path))
    assert reader.view(desc).sum() == 16
    first.close()
    with refused("does not exist", StaleDescriptor):
        reader.view(desc)
    # Same name, same pid after a container restart: the old descriptor must not read the new file.
    # The new segment has a new key, so the old descriptor fails its MAC before anything else.
    second = Arena.create("mm-sidecar-r-1", 1 * MiB, directory=str(tmp_path))
    assert second.header.key != first.header.key
    with refused("MAC does not verify"):
        reader.view(desc)
    _, new = _published(second, np.full(16, 2, np.float32))
    assert new.offset == desc.offset and reader.view(new).sum() == 32
    with refused("MAC does not verify"):
        reader.view(desc)
    # Same name, same offset, signed with the new key, but a generation the new segment never issued.
    assert new.generation != desc.generation
    with refused("the extent was freed or reused", StaleDescriptor):
        reader.view(desc.signed(second.header.key))
    reader.close()
    second.free(second.live_extents()[0])
    second.close()


def test_reader_close_reports_views_that_outlive_it(arena: Arena) -> None:
    _, desc = _published(arena, np.arange(16, dtype=np.float32))
    reader = ArenaReader(os.path.dirname(arena.path))
    view = reader.view(desc)
    with pytest.raises(BufferError, match="drop views before acking"):
        reader.close()
    assert view.sum() == 120  # the mapping lives as long as the view: no dangling memory
    del view
    reader.close()


def test_descriptor_json_round_trip_and_strictness() -> None:
    good = TensorDescriptor("mm-sidecar-a-1", 8192, 48, "float32", (3, 4), 5, "").signed(b"k" * 32)
    assert TensorDescriptor.from_json(good.to_json()) == good
    assert TensorDescriptor.from_json(dict(good.to_json(), shape=(3, 4))) == good
    assert sorted(good.to_json()) == sorted(("shm", "offset", "nbytes", "dtype", "shape", "generation", "mac"))
    cases: list[tuple[object, str]] = [
        ([], "descriptor: must be an object"),
        ({k: v for k, v in good.to_json().items() if k != "dtype"}, "descriptor.dtype: missing"),
        ({k: v for k, v in good.to_json().items() if k != "mac"}, "descriptor.mac: missing"),
        (dict(good.to_json(), extra=1), "descriptor: unknown field 'extra'"),
        (dict(good.to_json(), mac=None), "descriptor.mac: must be a string"),
        (dict(good.to_json(), mac=good.mac.upper()), "descriptor.mac: must be 64 lowercase hex digits"),
        (dict(good.to_json(), mac=good.mac[:-2]), "descriptor.mac: must be 64 lowercase hex digits"),
        (dict(good.to_json(), shm="arena0"), "descriptor.shm: segment name must be 'mm-sidecar-'"),
        (dict(good.to_json(), shape=[0, 2**70], nbytes=0), "descriptor.shape: at most 32 dims, each in [0, 2**63)"),
        (dict(good.to_json(), offset=True), "descriptor.offset: must be an integer"),
        (dict(good.to_json(), nbytes=48.0), "descriptor.nbytes: must be an integer"),
        (dict(good.to_json(), generation="5"), "descriptor.generation: must be an integer"),
        (dict(good.to_json(), shm=7), "descriptor.shm: must be a string"),
        (dict(good.to_json(), shape=[3, "4"]), "descriptor.shape: must be a list"),
        (dict(good.to_json(), shape=[3, True]), "descriptor.shape: must be a list"),
        (dict(good.to_json(), shape=12), "descriptor.shape: must be a list"),
        (dict(good.to_json(), dtype="complex64"), "descriptor.dtype: must be one of"),
        (dict(good.to_json(), nbytes=47), "descriptor.nbytes"),
        (dict(good.to_json(), shape=[1] * 33, nbytes=4), "descriptor.shape: at most"),
        (dict(good.to_json(), offset=2**63), "descriptor.offset"),
    ]
    for obj, message in cases:
        with refused(message):
            TensorDescriptor.from_json(obj)


# --------------------------------------------------------------------------- segment lifecycle


def test_segment_is_0600_exclusive_and_unlinked_only_by_its_creator(tmp_path: Path) -> None:
    a = Arena.create("mm-sidecar-life-1", 1 * MiB, directory=str(tmp_path))
    assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o600
    assert os.path.getsize(a.path) == 1 * MiB
    with pytest.raises(ArenaError, match="already exists"):
        Arena.create("mm-sidecar-life-1", 1 * MiB, directory=str(tmp_path))
    Arena.attach(a.name, str(tmp_path)).close()
    assert os.path.exists(a.path)
    a.close()
    a.close()  # idempotent
    assert not os.path.exists(a.path)
    with pytest.raises(ArenaError, match="closed"):
        a.reserve(1)


def test_replace_stale_keeps_the_successor_segment(tmp_path: Path) -> None:
    old = Arena.create("mm-sidecar-rep-1", 1 * MiB, directory=str(tmp_path))
    old_inode = os.stat(old.path).st_ino
    new = Arena.create("mm-sidecar-rep-1", 1 * MiB, directory=str(tmp_path), replace_stale=True)
    assert os.stat(new.path).st_ino != old_inode
    old.close()  # must not unlink the file its successor now owns under the same name
    assert os.path.exists(new.path)
    new.close()
    assert not os.path.exists(new.path)


def test_child_segments_survive_their_creator_and_are_found_stale(tmp_path: Path) -> None:
    d = str(tmp_path)
    prefix = "mm-sidecar-child-"
    mine = Arena.create(segment_name("child"), 64 * 1024, directory=d)
    try:
        # A normal exit runs every finalizer and atexit hook: no resource tracker may unlink our segment.
        pid_clean = _run_child(_create_and_return, d, "mm-sidecar-child-clean")
        pid_crash = _run_child(_create_and_die, d, "mm-sidecar-child-crash")
        assert os.path.exists(os.path.join(d, "mm-sidecar-child-clean"))
        assert os.path.exists(os.path.join(d, "mm-sidecar-child-crash"))
        # A creator killed before writing the header is known by the pid in the name.
        half = segment_name("child", pid_crash)
        (tmp_path / half).write_bytes(b"")
        (tmp_path / "mm-sidecar-child-notapid").write_bytes(b"")
        (tmp_path / "other-prefix-1").write_bytes(b"")
        assert pid_clean != os.getpid()
        expected = sorted(["mm-sidecar-child-clean", "mm-sidecar-child-crash", half])
        assert find_stale(d, prefix) == expected
        assert unlink_stale(d, prefix) == expected
        assert sorted(os.listdir(d)) == sorted([mine.name, "mm-sidecar-child-notapid", "other-prefix-1"])
    finally:
        mine.close()


def test_find_stale_sees_through_pid_reuse(tmp_path: Path) -> None:
    d = str(tmp_path)
    live = Arena.create(segment_name("reuse"), 64 * 1024, directory=d)
    assert find_stale(d, "mm-sidecar-reuse-") == []
    # Same pid, different start time: a restarted container's new pid 1, not the owner.
    with open(live.path, "r+b") as f:
        f.seek(56)
        f.write(struct.pack("<Q", live.header.owner_start + 1))
    assert find_stale(d, "mm-sidecar-reuse-") == [live.name]
    # A segment from before a reboot is stale whatever its pid says.
    with open(live.path, "r+b") as f:
        f.seek(56)
        f.write(struct.pack("<Q", live.header.owner_start))
        f.seek(72)
        f.write(b"\x01" * 16)
    assert find_stale(d, "mm-sidecar-reuse-") == [live.name]
    live.close()


def test_real_dev_shm_segment(tmp_path: Path) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    name = f"mm-sidecar-test{uuid.uuid4().hex[:12]}-{os.getpid()}"
    a = Arena.create(name, 2 * MiB)
    try:
        assert a.path == f"/dev/shm/{name}"
        _, desc = _published(a, np.arange(1000, dtype=np.float32))
        with ArenaReader() as reader:
            assert reader.copy_out(desc).sum().item() == sum(range(1000))
        assert name not in find_stale("/dev/shm", name)
    finally:
        for ext in a.live_extents():
            a.free(ext)
        a.close()
    assert not os.path.exists(f"/dev/shm/{name}")


# --------------------------------------------------------------------------- running out of space


def test_size_beyond_free_space_is_refused_up_front(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    size = (free // PAGE + 1024) * PAGE
    with pytest.raises(ArenaError) as info:
        Arena.create("mm-sidecar-big-1", size, directory=str(tmp_path))
    message = str(info.value)
    assert str(size) in message and "free" in message and str(tmp_path) in message
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="multiple of 4096"):
        Arena.create("mm-sidecar-odd-1", 3 * PAGE + 1, directory=str(tmp_path))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_tmpfs_gives_enospc_at_creation_not_sigbus_later(
    tiny_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Skip the up-front statvfs check so that posix_fallocate itself meets the full filesystem.
    monkeypatch.setattr(arena_mod, "_free_space", lambda directory: 1 << 40)
    with pytest.raises(ArenaError, match="2097152 bytes") as info:
        Arena.create("mm-sidecar-full-1", 2 * MiB, directory=str(tiny_tmpfs))
    assert isinstance(info.value.__cause__, OSError)
    assert os.listdir(tiny_tmpfs) == []
    monkeypatch.undo()
    with Arena.create("mm-sidecar-fits-1", 512 * 1024, directory=str(tiny_tmpfs)) as a:
        assert a.reserve(a.capacity) is not None
    with pytest.raises(ArenaError, match="does not fit"):
        Arena.create("mm-sidecar-full-1", 2 * MiB, directory=str(tiny_tmpfs))


def test_reader_drops_mappings_of_segments_that_are_gone(tmp_path: Path) -> None:
    """An engine outliving a sidecar restart must not keep the old arena's tmpfs pages mapped."""
    first = Arena.create("mm-sidecar-prune-1", 4 * 4096 * 16, directory=str(tmp_path))
    extent = first.reserve(100)
    assert extent is not None
    desc = first.write(extent, 0, np.arange(4, dtype=np.float32))
    first.publish(extent)
    reader = ArenaReader(str(tmp_path))
    try:
        assert reader.copy_out(desc).tolist() == [0.0, 1.0, 2.0, 3.0]
        assert reader.segments == ("mm-sidecar-prune-1",)
        first.free(extent)
        first.close()  # the old sidecar is gone: its file is unlinked
        second = Arena.create("mm-sidecar-prune-2", 4 * 4096 * 16, directory=str(tmp_path))
        try:
            extent = second.reserve(100)
            assert extent is not None
            desc = second.write(extent, 0, np.ones(2, dtype=np.float32))
            second.publish(extent)
            reader.copy_out(desc)  # attaching the new segment prunes the old mapping
            assert reader.segments == ("mm-sidecar-prune-2",)
            second.free(extent)
        finally:
            second.close()
    finally:
        reader.close()
