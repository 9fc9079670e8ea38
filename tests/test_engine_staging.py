"""Tests for engine.staging: reuse, size classes, the cap, and never lending memory that is still in use."""

from __future__ import annotations

import pytest
import torch

from engine.staging import DEFAULT_MIN_BYTES, StagingPool, size_class

MiB = 1 << 20


def test_a_buffer_given_back_is_lent_again() -> None:
    pool = StagingPool(64 * MiB)
    first = pool.take(5 * MiB)
    address = first.data.data_ptr()
    pool.give([first])
    del first
    again = pool.take(5 * MiB)
    assert again.data.data_ptr() == address
    stats = pool.stats
    assert (stats.hits, stats.misses, stats.held) == (1, 1, 1)
    pool.give([again])
    assert pool.stats.held == 0
    assert pool.stats.free_bytes == pool.stats.owned_bytes == size_class(5 * MiB)


def test_similar_sizes_share_a_buffer_but_a_much_larger_one_is_not_pinned_by_a_small_request() -> None:
    pool = StagingPool(256 * MiB)
    big = pool.take(50 * MiB)
    big_class = big.nbytes
    pool.give([big])
    del big
    # 23 MB would waste more than half of a 50 MB buffer: it gets its own.
    small = pool.take(23 * MiB)
    assert small.nbytes < big_class and pool.stats.misses == 2
    # 40 MB fits the cached 50 MB one.
    near = pool.take(40 * MiB)
    assert near.nbytes == big_class and pool.stats.hits == 1
    pool.give([small, near])


def test_size_classes_are_an_eighth_of_a_power_of_two_apart() -> None:
    assert size_class(1) == DEFAULT_MIN_BYTES
    assert size_class(1_001_952) == MiB
    assert size_class(22_993_152) == 22 * MiB  # 23 MB pixel_values: steps of 2 MiB
    assert size_class(50_621_088) == 52 * MiB  # 50.6 MB: steps of 4 MiB
    for n in (600_000, 3 * MiB + 1, 200 * MiB - 5):  # above 512 KiB, where the 64 KiB minimum step is moot
        assert n <= size_class(n) < n * 1.25


def test_two_holders_never_share_a_buffer() -> None:
    pool = StagingPool(64 * MiB)
    a, b = pool.take(4 * MiB), pool.take(4 * MiB)
    assert a.data.data_ptr() != b.data.data_ptr()
    pool.give([a, b])


def test_view_shapes_the_first_bytes_and_refuses_what_does_not_fit() -> None:
    pool = StagingPool(64 * MiB)
    buffer = pool.take(3 * 1176 * 4 * 100)
    view = buffer.view((300, 1176), torch.float32)
    assert view.shape == (300, 1176) and view.is_contiguous()
    assert view.data_ptr() == buffer.data.data_ptr()
    with pytest.raises(ValueError, match="do not fit"):
        buffer.view((buffer.nbytes + 1,), torch.uint8)
    del view
    pool.give([buffer])


def test_the_pool_never_owns_more_than_its_cap() -> None:
    pool = StagingPool(40 * MiB)
    a = pool.take(16 * MiB)
    b = pool.take(16 * MiB)
    # Held buffers leave 8 MiB: a third 16 MiB copy gets a plain tensor, not kept when given back.
    c = pool.take(16 * MiB)
    assert not c.pooled and c.nbytes == 16 * MiB
    assert pool.stats.owned_bytes == 32 * MiB and pool.stats.unpooled == 1
    pool.give([a, b, c])
    assert pool.stats.free_bytes == 32 * MiB
    # A 30 MiB buffer fits only once cached ones are freed: largest first, as many as needed.
    d = pool.take(30 * MiB)
    assert d.pooled and pool.stats.evicted == 2
    assert pool.stats.owned_bytes <= 40 * MiB
    pool.give([d])


def test_a_copy_larger_than_the_cap_is_served_unpooled() -> None:
    pool = StagingPool(8 * MiB)
    cached = pool.take(4 * MiB)
    pool.give([cached])
    big = pool.take(9 * MiB)
    assert not big.pooled
    assert pool.stats.evicted == 0  # nothing was freed for a buffer that could never fit
    pool.give([big])
    assert pool.stats.owned_bytes == pool.stats.free_bytes == 4 * MiB


def test_a_zero_cap_pools_nothing() -> None:
    pool = StagingPool(0)
    buffer = pool.take(4 * MiB)
    assert not buffer.pooled
    pool.give([buffer])
    assert pool.stats.owned_bytes == 0


def test_small_tensors_are_not_pooled() -> None:
    pool = StagingPool(64 * MiB)
    grid = pool.take(24)
    assert not grid.pooled and grid.nbytes == 24
    pool.give([grid])
    assert pool.stats.owned_bytes == 0 and pool.stats.unpooled == 1


def test_a_buffer_still_referenced_when_given_back_is_never_lent_again() -> None:
    pool = StagingPool(64 * MiB)
    buffer = pool.take(4 * MiB)
    kept = buffer.view((MiB,), torch.float32)  # e.g. a tensor the model held on to
    kept.fill_(7.0)
    pool.give([buffer])
    del buffer
    assert pool.stats.still_shared == 1
    assert pool.stats.owned_bytes == 0 and pool.stats.free_bytes == 0
    other = pool.take(4 * MiB)
    other.data.fill_(0)
    assert other.data.data_ptr() != kept.data_ptr()
    assert bool((kept == 7.0).all())
    pool.give([other])


def test_giving_back_twice_or_a_stranger_is_refused() -> None:
    pool = StagingPool(64 * MiB)
    buffer = pool.take(4 * MiB)
    pool.give([buffer])
    with pytest.raises(ValueError, match="twice"):
        pool.give([buffer])
    stranger = StagingPool(64 * MiB).take(4 * MiB)
    with pytest.raises(ValueError, match="not lent by this pool"):
        pool.give([stranger])


def test_clear_frees_the_cache_and_held_buffers_still_come_back() -> None:
    pool = StagingPool(64 * MiB)
    held, cached = pool.take(4 * MiB), pool.take(8 * MiB)
    pool.give([cached])
    pool.clear()
    assert pool.stats.owned_bytes == 4 * MiB and pool.stats.free_bytes == 0
    pool.give([held])
    assert pool.stats.free_bytes == 4 * MiB


def test_prefault_leaves_warm_buffers_in_the_pool() -> None:
    pool = StagingPool(64 * MiB)
    pool.prefault([20 * MiB, 4 * MiB])
    assert pool.stats.free_bytes == size_class(20 * MiB) + size_class(4 * MiB)
    assert pool.stats.held == 0
    buffer = pool.take(19 * MiB)
    assert pool.stats.hits == 1
    pool.give([buffer])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="cap_bytes"):
        StagingPool(-1)
    with pytest.raises(ValueError, match="min_bytes"):
        StagingPool(MiB, min_bytes=0)
