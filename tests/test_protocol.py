"""Descriptors are capabilities: the MAC, the fixed refusal message, and what the reader never opens.

Real segments in a temporary directory (tmpfs or not, the reader does not care), real processes where
a second one matters; nothing is mocked. The threat model is in `preprocess.protocol`'s docstring.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import pickle
import secrets
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from preprocess.arena import Arena, ArenaError, segment_name
from preprocess.extents import Extent
from preprocess.protocol import (
    DESCRIPTOR_ERROR,
    KEY_BYTES,
    PAGE,
    VERSION,
    ArenaReader,
    DescriptorError,
    ImageNormalization,
    StaleDescriptor,
    TensorDescriptor,
    check_normalize,
    descriptor_mac,
)

from .test_arena import refused

SPAWN = multiprocessing.get_context("spawn")
MiB = 1 << 20
KEY_OFFSET = 92  # in the header page: see the layout in preprocess.protocol
VERSION_OFFSET = 8


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    a = Arena.create(segment_name("proto"), 4 * MiB, directory=str(tmp_path))
    yield a
    for extent in a.live_extents():
        a.free(extent)
    a.close()


@pytest.fixture
def reader(arena: Arena) -> Iterator[ArenaReader]:
    r = ArenaReader(os.path.dirname(arena.path))
    yield r
    r.close()


def publish(arena: Arena, array: np.ndarray[Any, Any]) -> tuple[Extent, TensorDescriptor]:
    extent = arena.reserve(array.nbytes)
    assert extent is not None
    desc = arena.write(extent, 0, array)
    arena.publish(extent)
    return extent, desc


def every_read(reader: ArenaReader) -> list[Callable[[TensorDescriptor], object]]:
    """Every way in: each must check the MAC before it touches the data area."""

    def into_host(desc: TensorDescriptor) -> object:
        return reader.copy_out(desc, out=torch.empty(desc.shape, dtype=getattr(torch, desc.dtype)))

    return [reader.validate, reader.view, reader.tensor, reader.copy_out, into_host]


VICTIM = np.arange(4 * 64, dtype=np.float32).reshape(4, 64)


# --------------------------------------------------------------------------- the key and the MAC


def test_the_creator_writes_a_random_key_into_the_header_and_signs_every_descriptor(
    arena: Arena, tmp_path: Path
) -> None:
    key = arena.header.key
    assert len(key) == KEY_BYTES and key != bytes(KEY_BYTES)
    assert Path(arena.path).read_bytes()[KEY_OFFSET : KEY_OFFSET + KEY_BYTES] == key
    assert key.hex() not in repr(arena.header) and repr(key) not in repr(arena.header)
    other = Arena.create(segment_name("proto-other"), 1 * MiB, directory=str(tmp_path))
    try:
        assert other.header.key != key  # per segment
    finally:
        other.close()
    _, desc = publish(arena, VICTIM)
    assert desc.verify(key)
    assert desc.mac == descriptor_mac(key, desc.shm, desc.offset, desc.nbytes, desc.dtype, desc.shape, desc.generation)
    # A worker that attached the segment reads the same key and signs the same way.
    extent = arena.reserve(64)
    assert extent is not None
    worker = Arena.attach(arena.name, os.path.dirname(arena.path), pretouch=False)
    try:
        assert worker.header.key == key
        assert worker.descriptor(extent, 0, "uint8", (64,)).verify(key)
    finally:
        worker.close()


def test_a_forged_mac_is_refused_before_the_table_or_the_data_is_read(
    arena: Arena, reader: ArenaReader, tmp_path: Path
) -> None:
    _, genuine = publish(arena, VICTIM)
    other = Arena.create(segment_name("proto-other"), 1 * MiB, directory=str(tmp_path))
    try:
        forgeries = {
            "random mac": dataclasses.replace(genuine, mac=secrets.token_hex(32)),
            "wrong key": genuine.signed(secrets.token_bytes(KEY_BYTES)),
            "another segment's key": genuine.signed(other.header.key),
            "all zeros": dataclasses.replace(genuine, mac="0" * 64),
        }
        for label, forged in forgeries.items():
            assert forged.to_json().keys() == genuine.to_json().keys()  # the right layout, the live generation
            for read in every_read(reader):
                with refused("MAC does not verify") as info:
                    read(forged)
                assert not isinstance(info.value, StaleDescriptor), label
    finally:
        other.close()
    out = torch.full(VICTIM.shape, -1.0)
    with refused("MAC does not verify"):
        reader.copy_out(forgeries["wrong key"], out=out)
    assert bool((out == -1.0).all())  # not a byte was copied
    # The MAC comes first: a forgery learns nothing of the table or the bounds from its refusal.
    writing = arena.reserve(64)
    assert writing is not None
    unpublished = arena.descriptor(writing, 0, "uint8", (64,))
    with refused("not published yet"):
        reader.view(unpublished)
    with refused("MAC does not verify"):
        reader.view(dataclasses.replace(unpublished, mac=secrets.token_hex(32)))
    outside = dataclasses.replace(genuine, offset=arena.size + PAGE)
    with refused("MAC does not verify"):
        reader.view(outside)
    with refused("outside the data area"):
        reader.view(outside.signed(arena.header.key))
    assert reader.view(genuine).tobytes() == VICTIM.tobytes()  # the genuine one still reads


def test_changing_any_field_after_signing_breaks_the_mac(arena: Arena, reader: ArenaReader, tmp_path: Path) -> None:
    _, victim = publish(arena, VICTIM)
    key = arena.header.key
    r = dataclasses.replace
    # Each of these is a readable descriptor once signed with the key: only the MAC refuses it.
    readable = {
        "offset": r(victim, offset=victim.offset + 256),
        "nbytes and shape": r(victim, nbytes=512, shape=(2, 64)),
        "dtype": r(victim, dtype="int32"),
        "shape": r(victim, shape=(64, 4)),
    }
    for label, changed in readable.items():
        with refused("MAC does not verify") as info:
            reader.view(changed)
        assert not isinstance(info.value, StaleDescriptor), label
        reader.view(changed.signed(key))  # the control: with the sidecar's MAC it would have been read
    # nbytes alone no longer matches the shape: refused for that, before the segment is looked at.
    with refused("descriptor.nbytes"):
        reader.view(r(victim, nbytes=victim.nbytes + 4))
    # The generation: refused by the MAC; signed, it is a generation the extent does not hold.
    with refused("MAC does not verify"):
        reader.view(r(victim, generation=victim.generation + 1))
    with refused("the extent was freed or reused", StaleDescriptor):
        reader.view(r(victim, generation=victim.generation + 1).signed(key))
    # Retargeting a descriptor of one's own at the victim's extent, generation and all.
    own_extent, own = publish(arena, np.zeros((4, 64), np.float32))
    aimed = r(own, offset=victim.offset, generation=victim.generation)
    with refused("MAC does not verify"):
        reader.view(aimed)
    assert reader.view(aimed.signed(key)).tobytes() == VICTIM.tobytes()  # the control
    # The segment: the same extent named in another live segment, signed for this one.
    other = Arena.create(segment_name("proto-other"), 4 * MiB, directory=str(tmp_path))
    try:
        extent = other.reserve(VICTIM.nbytes)
        assert extent is not None and extent.offset == victim.offset
        other.write(extent, 0, VICTIM)
        other.publish(extent)
        with refused("MAC does not verify"):
            reader.view(r(victim, shm=other.name))
        with refused("MAC does not verify"):
            reader.view(r(victim, shm=other.name, generation=extent.generation))
        other.free(extent)
    finally:
        other.close()
    arena.free(own_extent)


def test_a_genuine_descriptor_replayed_after_free_or_reuse_is_stale(arena: Arena, reader: ArenaReader) -> None:
    extent, genuine = publish(arena, VICTIM)
    assert reader.copy_out(genuine).numpy().tobytes() == VICTIM.tobytes()
    arena.free(extent)
    for read in every_read(reader):
        with refused("the extent was freed or reused", StaleDescriptor):
            read(genuine)
    # The next request's data at the same offset is never what the old descriptor reads.
    again, _ = publish(arena, np.full((4, 64), 7, np.float32))
    assert again.offset == extent.offset and again.generation > extent.generation
    for read in every_read(reader):
        with refused("the extent was freed or reused", StaleDescriptor):
            read(genuine)


def test_generations_start_at_random_and_advance_by_random_strides(tmp_path: Path) -> None:
    firsts = []
    for i in range(2):
        with Arena.create(segment_name(f"gen{i}"), 1 * MiB, directory=str(tmp_path), pretouch=False) as a:
            generations = []
            for _ in range(50):
                extent = a.reserve(1)
                assert extent is not None
                generations.append(extent.generation)
                a.free(extent)
            firsts.append(generations[0])
            strides = [b - g for g, b in itertools.pairwise(generations)]
            assert all(1 <= s <= 1 << 16 for s in strides)  # strictly increasing: never reused
            assert len(set(strides)) > 1  # not a counter: the next one cannot be told from the last
            assert generations[-1] < 1 << 61  # far below the bound of 2**62
    assert firsts[0] != firsts[1]


# --------------------------------------------------------------------------- the wire form


def test_from_json_takes_exactly_seven_fields_with_a_well_formed_mac(arena: Arena) -> None:
    _, desc = publish(arena, VICTIM)
    wire = desc.to_json()
    assert TensorDescriptor.from_json(wire) == desc
    cases: list[tuple[dict[str, Any], str]] = [
        ({k: v for k, v in wire.items() if k != "mac"}, "descriptor.mac: missing"),
        ({**wire, "token": "x"}, "descriptor: unknown field 'token'"),
        ({**wire, "mac2": wire["mac"]}, "descriptor: unknown field 'mac2'"),
        ({**wire, "mac": 5}, "descriptor.mac: must be a string"),
        ({**wire, "mac": ""}, "descriptor.mac: must be 64 lowercase hex digits"),
        ({**wire, "mac": wire["mac"].upper()}, "descriptor.mac: must be 64 lowercase hex digits"),
        ({**wire, "mac": wire["mac"] + "00"}, "descriptor.mac: must be 64 lowercase hex digits"),
    ]
    for obj, cause in cases:
        with refused(cause):
            TensorDescriptor.from_json(obj)


# --------------------------------------------------------------------------- what is never opened


def _within(seconds: float, call: Callable[[], object], fifo: Path) -> BaseException | None:
    """Run `call` in a thread; if it is still blocked after `seconds`, unblock it by opening the FIFO
    for writing, and fail: a reader that blocks here would hang an engine forever."""
    caught: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        thread.join(10)
        os.close(fd)
        pytest.fail(f"{call} blocked on the FIFO {fifo}")
    return caught[0] if caught else None


def test_a_fifo_under_a_segment_name_is_refused_without_blocking(
    arena: Arena, reader: ArenaReader, tmp_path: Path
) -> None:
    _, genuine = publish(arena, VICTIM)
    fifo = tmp_path / "mm-sidecar-fifo-1"
    os.mkfifo(fifo, 0o600)
    error = _within(5, lambda: reader.view(dataclasses.replace(genuine, shm=fifo.name)), fifo)
    assert isinstance(error, DescriptorError) and str(error) == DESCRIPTOR_ERROR
    assert "not a regular file" in error.detail
    # A FIFO swapped in between the stat and the open: the open itself must not wait for a writer.
    error = _within(5, lambda: reader._attach(fifo.name, str(fifo)), fifo)
    assert isinstance(error, DescriptorError) and "not a regular file" in error.detail
    assert fifo.name not in reader.segments


def test_names_without_the_segment_prefix_are_refused_before_anything_is_opened(arena: Arena, tmp_path: Path) -> None:
    _, genuine = publish(arena, VICTIM)
    # A perfect copy of the segment, key and all, under a name that is not a segment's: a descriptor
    # for it verifies, so only the name check can refuse it, and it must do so before opening.
    shutil.copyfile(arena.path, tmp_path / "secret-copy")
    os.chmod(tmp_path / "secret-copy", 0o600)
    with ArenaReader(str(tmp_path)) as fresh:
        for name in ("secret-copy", "mm-sidecar-", "mm-sidecar", "MM-SIDECAR-proto-1", ".", "..", "../x"):
            forged = dataclasses.replace(genuine, shm=name).signed(arena.header.key)
            for read in every_read(fresh):
                with refused("descriptor.shm: segment name must be 'mm-sidecar-'"):
                    read(forged)
        assert fresh.segments == ()  # nothing was attached, hence nothing opened
        assert fresh.view(genuine).tobytes() == VICTIM.tobytes()


def test_other_format_versions_a_missing_key_and_shared_files_are_refused(arena: Arena) -> None:
    _, genuine = publish(arena, VICTIM)
    directory = os.path.dirname(arena.path)
    with open(arena.path, "r+b") as f:
        f.seek(VERSION_OFFSET)
        f.write(struct.pack("<I", VERSION - 1))
    with ArenaReader(directory) as fresh, refused("unsupported arena format: version 1"):
        fresh.view(genuine)
    with pytest.raises(ArenaError, match="unsupported arena format: version 1"):
        Arena.attach(arena.name, directory, pretouch=False)
    with open(arena.path, "r+b") as f:
        f.seek(VERSION_OFFSET)
        f.write(struct.pack("<I", VERSION))
        f.seek(KEY_OFFSET)
        f.write(bytes(KEY_BYTES))
    with ArenaReader(directory) as fresh, refused("no key"):
        fresh.view(genuine)
    with open(arena.path, "r+b") as f:
        f.seek(KEY_OFFSET)
        f.write(arena.header.key)
    os.chmod(arena.path, 0o640)  # a key the group can read is no secret
    with ArenaReader(directory) as fresh, refused("open to other users (mode 640)"):
        fresh.view(genuine)
    os.chmod(arena.path, 0o600)
    with ArenaReader(directory) as fresh:
        assert fresh.view(genuine).tobytes() == VICTIM.tobytes()


# --------------------------------------------------------------------------- the fixed message


def test_every_refusal_says_only_the_fixed_message(arena: Arena, reader: ArenaReader, tmp_path: Path) -> None:
    extent, genuine = publish(arena, VICTIM)
    (tmp_path / "mm-sidecar-junk-1").write_bytes(b"PRIVATE!" * PAGE)
    os.chmod(tmp_path / "mm-sidecar-junk-1", 0o600)
    r = dataclasses.replace
    causes: list[Callable[[], object]] = [
        lambda: TensorDescriptor.from_json({"shm": 1}),
        lambda: reader.view(r(genuine, mac=secrets.token_hex(32))),
        lambda: reader.view(r(genuine, offset=arena.size).signed(arena.header.key)),
        lambda: reader.view(r(genuine, shm="mm-sidecar-nobody-1")),
        lambda: reader.view(r(genuine, shm="mm-sidecar-junk-1")),
        lambda: reader.view(r(genuine, generation=genuine.generation + 1).signed(arena.header.key)),
        lambda: reader.view(r(genuine, shm="passwd")),
    ]
    errors: list[DescriptorError] = []
    for cause in causes:
        with pytest.raises(DescriptorError) as info:
            cause()
        errors.append(info.value)
    arena.free(extent)
    with pytest.raises(StaleDescriptor) as stale:
        reader.copy_out(genuine)
    errors.append(stale.value)
    details = set()
    for error in errors:
        assert str(error) == DESCRIPTOR_ERROR and error.args == (DESCRIPTOR_ERROR,)
        assert repr(error) == f"{type(error).__name__}({DESCRIPTOR_ERROR!r})"
        assert error.detail and error.detail not in repr(error)
        assert "PRIVATE" not in error.detail
        # Across processes (a rank's report, a pool's result) the class and the detail survive.
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.detail == error.detail and str(copy) == DESCRIPTOR_ERROR
        details.add(error.detail)
    assert len(details) == len(errors)  # every cause distinct in the log, identical on the wire


# --------------------------------------------------------------------------- another process


def _read_in_child(directory: str, wires: list[dict[str, Any]]) -> list[str]:
    """A separate process with nothing but the directory: what does each descriptor read as?"""
    out = []
    with ArenaReader(directory) as reader:
        for wire in wires:
            try:
                out.append(reader.copy_out(TensorDescriptor.from_json(wire)).numpy().tobytes().hex())
            except DescriptorError as exc:
                out.append(f"{exc}: {exc.detail}")
    return out


def test_a_reader_in_another_process_takes_the_key_from_the_segment(arena: Arena) -> None:
    _, genuine = publish(arena, VICTIM)
    forged = genuine.signed(secrets.token_bytes(KEY_BYTES))
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        read = pool.submit(_read_in_child, os.path.dirname(arena.path), [genuine.to_json(), forged.to_json()])
        good, bad = read.result(60)
    assert bytes.fromhex(good) == VICTIM.tobytes()
    assert bad.startswith(DESCRIPTOR_ERROR + ": ") and "MAC does not verify" in bad


_OWN = ImageNormalization(1 / 255, (0.5, 0.25, 0.125), (0.5, 0.5, 2.0))
_OWN_JSON = '{"rescale_factor":0.00392156862745098,"image_mean":[0.5,0.25,0.125],"image_std":[0.5,0.5,2.0]}'


@pytest.mark.parametrize(
    ("given", "dtype", "own", "message"),
    [
        (_OWN.to_json(), "uint8", _OWN, None),
        (None, "float32", _OWN, None),
        (None, "bfloat16", None, None),
        (
            _OWN.to_json(),
            "float32",
            _OWN,
            "f.normalize: only uint8 pixel_values carry a normalisation; this part has float32 pixel_values, "
            "used as they are",
        ),
        (
            _OWN.to_json(),
            None,
            _OWN,
            "f.normalize: only uint8 pixel_values carry a normalisation; this part has no pixel_values, "
            "used as they are",
        ),
        (_OWN.to_json(), "uint8", None, "f.normalize: NO REASON: it takes no uint8 pixel_values"),
        (
            None,
            "uint8",
            _OWN,
            "f.normalize: uint8 pixel_values need the normalisation they were made for (rescale_factor, image_mean, "
            f"image_std); this model's is {_OWN_JSON}",
        ),
        (
            {**_OWN.to_json(), "image_std": [0.5, 0.5]},
            "uint8",
            _OWN,
            "f.normalize.image_std: has 2 values, this model's image processor has 3 (one per channel)",
        ),
        (
            {**_OWN.to_json(), "rescale_factor": 0.0039},
            "uint8",
            _OWN,
            f"f.normalize: {_OWN_JSON.replace('0.00392156862745098', '0.0039')} does not match this model's image "
            f"processor ({_OWN_JSON}): the sidecar's preprocess.processor must be the served model's",
        ),
        ({"rescale_factor": 1}, "uint8", _OWN, "f.normalize: must have exactly the keys"),
    ],
)
def test_check_normalize_names_what_differs(given: Any, dtype: str | None, own: Any, message: str | None) -> None:
    # The one check both engines (reference and the vLLM plugin) answer a tensor part's normalize with.
    if message is None:
        check_normalize(given, dtype, own, "f.normalize", "NO REASON")
        return
    with pytest.raises(ValueError) as caught:
        check_normalize(given, dtype, own, "f.normalize", "NO REASON")
    assert str(caught.value).startswith(message), str(caught.value)
