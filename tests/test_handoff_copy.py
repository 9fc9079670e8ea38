"""Tests for `ArenaReader.copy_out(desc, out=...)`: the engine's copy into a buffer it keeps between requests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from preprocess.arena import Arena, segment_name
from preprocess.extents import Extent
from preprocess.protocol import DESCRIPTOR_ERROR, ArenaReader, StaleDescriptor, TensorDescriptor

MiB = 1 << 20


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    a = Arena.create(segment_name("copy"), 4 * MiB, directory=str(tmp_path))
    yield a
    a.close()


def published(arena: Arena, array: np.ndarray[Any, Any], dtype: str | None = None) -> tuple[Extent, TensorDescriptor]:
    ext = arena.reserve(max(array.nbytes, 1))
    assert ext is not None
    desc = arena.write(ext, 0, array, dtype=dtype)
    arena.publish(ext)
    return ext, desc


def test_copy_into_out_writes_and_returns_it(arena: Arena) -> None:
    array = np.random.default_rng(0).standard_normal((37, 1176), dtype=np.float32)
    _, desc = published(arena, array)
    out = torch.full((37, 1176), -1.0)
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        got = reader.copy_out(desc, out=out)
    assert got is out
    assert np.array_equal(out.numpy(), array)


def test_copy_into_a_view_of_a_larger_buffer_leaves_the_rest_alone(arena: Arena) -> None:
    array = np.arange(100, dtype=np.int64).reshape(4, 25)
    _, desc = published(arena, array)
    backing = torch.full((1000,), 255, dtype=torch.uint8)
    out = backing[: array.nbytes].view(torch.int64).view(4, 25)
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        reader.copy_out(desc, out=out)
    assert out.tolist() == array.tolist()
    assert bool((backing[array.nbytes :] == 255).all())


def test_bfloat16_bool_and_empty_tensors_copy_bit_for_bit(arena: Arena) -> None:
    bits = torch.randn(33, dtype=torch.bfloat16)
    cases = [
        (bits.view(torch.int16).numpy().view(np.uint16), "bfloat16", torch.bfloat16, bits),
        (np.array([True, False, True]), None, torch.bool, torch.tensor([True, False, True])),
        (np.zeros((0, 3), np.float16), None, torch.float16, torch.zeros((0, 3), dtype=torch.float16)),
    ]
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        for array, dtype, torch_dtype, expected in cases:
            _, desc = published(arena, array, dtype)
            out = torch.empty(desc.shape, dtype=torch_dtype)
            assert torch.equal(reader.copy_out(desc, out=out), expected)


def test_out_of_another_shape_or_dtype_is_refused(arena: Arena) -> None:
    _, desc = published(arena, np.ones((4, 4), np.float32))
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        for out in (torch.empty(16), torch.empty((4, 4), dtype=torch.float16), torch.empty((8, 8))[:, ::2]):
            with pytest.raises(ValueError, match="out is"):
                reader.copy_out(desc, out=out)


def test_a_non_contiguous_out_is_filled_through_torch(arena: Arena) -> None:
    array = np.arange(16, dtype=np.float32).reshape(4, 4)
    _, desc = published(arena, array)
    out = torch.zeros((4, 4)).t()
    with ArenaReader(os.path.dirname(arena.path)) as reader:
        reader.copy_out(desc, out=out)
    assert out.tolist() == array.tolist()


def test_a_stale_descriptor_is_refused_before_out_is_touched(arena: Arena) -> None:
    ext, desc = published(arena, np.ones(100, np.float32))
    arena.free(ext)
    out = torch.full((100,), 3.0)
    with ArenaReader(os.path.dirname(arena.path)) as reader, pytest.raises(StaleDescriptor) as info:
        reader.copy_out(desc, out=out)
    assert str(info.value) == DESCRIPTOR_ERROR and "the extent was freed or reused" in info.value.detail
    assert bool((out == 3.0).all())


def test_reuse_while_copying_into_out_is_detected(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    ext, desc = published(arena, np.ones(1000, np.float32))
    real_copyto = np.copyto

    def sidecar_gives_up_meanwhile(dst: Any, src: Any, **kwargs: Any) -> None:
        real_copyto(dst, src, **kwargs)
        arena.free(ext)  # the ack timed out: the extent goes to another request
        assert arena.reserve(8) is not None

    monkeypatch.setattr(np, "copyto", sidecar_gives_up_meanwhile)
    with ArenaReader(os.path.dirname(arena.path)) as reader, pytest.raises(StaleDescriptor) as info:
        reader.copy_out(desc, out=torch.empty(1000))
    monkeypatch.undo()
    assert str(info.value) == DESCRIPTOR_ERROR and "changed while it was copied" in info.value.detail
    for e in arena.live_extents():
        arena.free(e)
