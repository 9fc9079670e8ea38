"""Tests for engine.ranks: the handoff into staging buffers and their return, on one rank and on two (gloo).

One rank (`world=1`) runs in this process against a real arena, with a stand-in model that records
what it was given. The two-rank tests spawn a gloo group and run `Rank.issue` / `Rank.follow`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.ranks import Copy, Drop, Generate, HandoffError, Rank, Stop, checksum
from engine.staging import StagingPool
from preprocess.arena import Arena, segment_name
from preprocess.extents import pack_tensors
from preprocess.protocol import DESCRIPTOR_ERROR, StaleDescriptor, TensorDescriptor

from .conftest import free_port

MiB = 1 << 20
ROW = 1176
SPAWN = multiprocessing.get_context("spawn")
TIMEOUT_S = 120


class RecordingModel:
    """What Rank reads of a model: the device, build_inputs and generate. Records what it saw."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.seen: list[list[dict[str, torch.Tensor]]] = []
        self.keep: list[torch.Tensor] = []  # tensors a misbehaving model holds on to
        self.hold_inputs = False
        self.fail: Exception | None = None
        self.extra: list[int] = []  # more ids after the first, to stream
        self.fail_after: int | None = None  # fail once this many ids were handed to on_token

    def build_inputs(
        self, messages: Sequence[Mapping[str, Any]], images: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        self.seen.append([{n: t.clone() for n, t in image.items()} for image in images])
        if self.hold_inputs:
            self.keep.extend(t for image in images for t in image.values())
        # Like VLModel.build_inputs: the pixel values are concatenated into a new tensor.
        return {"pixel_values": torch.cat([image["pixel_values"] for image in images])} if images else {}

    def generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        *,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        if self.fail is not None:
            raise self.fail
        ids = [int(inputs["pixel_values"].numel()) if inputs else 0, *self.extra]
        for n, token in enumerate(ids):  # as VLModel does: each id as it is picked
            if n == self.fail_after:
                raise RuntimeError("failed mid-generation")
            if on_token is not None:
                on_token(token)
        return ids


@pytest.fixture
def arena(tmp_path: Path) -> Iterator[Arena]:
    a = Arena.create(segment_name("ranks"), 64 * MiB, directory=str(tmp_path))
    yield a
    a.close()


@pytest.fixture
def rank(tmp_path: Path) -> Iterator[Rank]:
    state = Rank(model=RecordingModel(), shm_dir=str(tmp_path), world=1, rank=0, staging=StagingPool(32 * MiB))  # type: ignore[arg-type]
    yield state
    state.reader.close()


Arrays = dict[str, np.ndarray[Any, Any]]


def publish(arena: Arena, rows: int, seed: int = 0) -> tuple[dict[str, TensorDescriptor], Arrays]:
    """One image's tensors written and published in the arena, as a sidecar worker does."""
    arrays: Arrays = {
        "pixel_values": np.random.default_rng(seed).standard_normal((rows, ROW), dtype=np.float32),
        "image_grid_thw": np.array([[1, 2, rows // 2]], dtype=np.int64),
    }
    offsets, total = pack_tensors([a.nbytes for a in arrays.values()])
    extent = arena.reserve(total)
    assert extent is not None
    descs = {n: arena.write(extent, off, a) for (n, a), off in zip(arrays.items(), offsets, strict=True)}
    arena.publish(extent, total)
    return descs, arrays


def model_of(rank: Rank) -> RecordingModel:
    assert isinstance(rank.model, RecordingModel)
    return rank.model


def test_copy_stages_the_arena_tensors_in_pool_buffers_and_generate_gives_them_back(rank: Rank, arena: Arena) -> None:
    descs, arrays = publish(arena, 1000)
    rank.issue(Copy("r1", [descs]))
    staged = rank.staged["r1"][0]
    assert np.array_equal(staged["pixel_values"].numpy(), arrays["pixel_values"])
    assert np.array_equal(staged["image_grid_thw"].numpy(), arrays["image_grid_thw"])
    assert rank.staging.stats.held == 1  # pixel_values; the 24-byte grid is not pooled
    del staged
    assert rank.issue(Generate("r1", [], 4)).tokens == [1000 * ROW]
    assert np.array_equal(model_of(rank).seen[0][0]["pixel_values"].numpy(), arrays["pixel_values"])
    assert "r1" not in rank.staged
    stats = rank.staging.stats
    assert (stats.held, stats.still_shared) == (0, 0) and stats.free_bytes > 0


def test_the_next_request_copies_into_the_same_warm_buffer(rank: Rank, arena: Arena) -> None:
    first, _ = publish(arena, 1000, seed=1)
    rank.issue(Copy("r1", [first]))
    address = rank.staged["r1"][0]["pixel_values"].data_ptr()
    rank.issue(Drop("r1"))
    second, arrays = publish(arena, 900, seed=2)
    rank.issue(Copy("r2", [second]))
    staged = rank.staged["r2"][0]["pixel_values"]
    assert staged.data_ptr() == address and rank.staging.stats.hits == 1
    assert np.array_equal(staged.numpy(), arrays["pixel_values"])


def test_a_buffer_in_use_is_not_lent_to_the_next_request(rank: Rank, arena: Arena) -> None:
    first, arrays = publish(arena, 1000, seed=1)
    second, _ = publish(arena, 1000, seed=2)
    rank.issue(Copy("r1", [first]))
    rank.issue(Copy("r2", [second]))
    one, two = rank.staged["r1"][0]["pixel_values"], rank.staged["r2"][0]["pixel_values"]
    assert one.data_ptr() != two.data_ptr()
    assert np.array_equal(one.numpy(), arrays["pixel_values"])


def test_a_tensor_the_model_keeps_is_never_overwritten(rank: Rank, arena: Arena) -> None:
    model_of(rank).hold_inputs = True
    first, arrays = publish(arena, 1000, seed=1)
    rank.issue(Copy("r1", [first]))
    rank.issue(Generate("r1", [], 4))
    assert rank.staging.stats.still_shared == 1
    second, _ = publish(arena, 1000, seed=2)
    rank.issue(Copy("r2", [second]))
    kept = model_of(rank).keep[0]
    assert kept.data_ptr() != rank.staged["r2"][0]["pixel_values"].data_ptr()
    assert np.array_equal(kept.numpy(), arrays["pixel_values"])


def test_a_failed_generate_still_gives_the_buffers_back(rank: Rank, arena: Arena) -> None:
    model_of(rank).fail = RuntimeError("out of memory")
    descs, _ = publish(arena, 1000)
    rank.issue(Copy("r1", [descs]))
    with pytest.raises(RuntimeError, match="out of memory"):
        rank.issue(Generate("r1", [], 4))
    stats = rank.staging.stats
    assert (stats.held, stats.still_shared) == (0, 0) and stats.free_bytes > 0


def test_generate_hands_each_token_to_on_token_in_order_and_returns_the_same_ids(rank: Rank, arena: Arena) -> None:
    model_of(rank).extra = [7, 8, 9]
    descs, _ = publish(arena, 1000)
    rank.issue(Copy("r1", [descs]))
    seen: list[int] = []
    generated = rank.issue(Generate("r1", [], 4), on_token=seen.append)
    assert seen == generated.tokens == [1000 * ROW, 7, 8, 9]
    stats = rank.staging.stats
    assert (stats.held, stats.still_shared) == (0, 0)
    assert rank.issue(Generate("r2", [], 4)).tokens == [0, 7, 8, 9]  # no callback: nothing else changes


def test_a_token_callback_that_raises_does_not_stop_generation(rank: Rank, caplog: pytest.LogCaptureFixture) -> None:
    # Rank 0 stopping while the other ranks generate on would leave them waiting in a collective.
    model_of(rank).extra = [7, 8, 9]
    calls: list[int] = []

    def gone(token: int) -> None:
        calls.append(token)
        raise RuntimeError("Event loop is closed")

    with caplog.at_level(logging.ERROR, logger="mm_engine.ranks"):
        assert rank.issue(Generate("r1", [], 4), on_token=gone).tokens == [0, 7, 8, 9]
    assert calls == [0]  # not called again after it failed
    assert "r1: the token callback failed" in caplog.text


def test_a_generation_that_fails_midway_has_streamed_what_it_picked(rank: Rank, arena: Arena) -> None:
    model_of(rank).extra, model_of(rank).fail_after = [7, 8, 9], 2
    descs, _ = publish(arena, 1000)
    rank.issue(Copy("r1", [descs]))
    seen: list[int] = []
    with pytest.raises(RuntimeError, match="mid-generation"):
        rank.issue(Generate("r1", [], 4), on_token=seen.append)
    assert seen == [1000 * ROW, 7]
    stats = rank.staging.stats
    assert (stats.held, stats.still_shared) == (0, 0) and stats.free_bytes > 0


def test_a_stale_descriptor_fails_the_handoff_before_anything_is_copied(rank: Rank, arena: Arena) -> None:
    good, _ = publish(arena, 1000, seed=1)
    stale, _ = publish(arena, 1000, seed=2)
    # A descriptor whose generation the arena never issued (signed, so the MAC passes) reads as freed or reused.
    gone = {**stale, "pixel_values": _with_generation(stale["pixel_values"], 1, arena.header.key)}
    with pytest.raises(HandoffError) as info:
        rank.issue(Copy("r1", [good, gone]))
    assert info.value.refused and info.value.status == 400
    assert str(info.value) == DESCRIPTOR_ERROR and "the extent was freed or reused" in info.value.detail
    assert "r1" not in rank.staged
    assert rank.staging.stats.held == 0 and rank.staging.stats.misses == 0


def test_a_forged_descriptor_fails_the_handoff_with_the_fixed_message_only(rank: Rank, arena: Arena) -> None:
    good, _ = publish(arena, 1000, seed=1)
    victim, _ = publish(arena, 1000, seed=2)
    # The victim's live extent, its layout and generation, with a MAC made under some other key.
    forged = {n: d.signed(secrets.token_bytes(32)) for n, d in victim.items()}
    for image in (forged, {**victim, "pixel_values": dataclasses.replace(victim["pixel_values"], mac="0" * 64)}):
        with pytest.raises(HandoffError) as info:
            rank.issue(Copy("r1", [good, image], checksums=True))
        assert info.value.refused and info.value.status == 400
        assert str(info.value) == DESCRIPTOR_ERROR and "MAC does not verify" in info.value.detail
        assert "r1" not in rank.staged
        assert rank.staging.stats.held == 0 and rank.staging.stats.misses == 0  # nothing was copied
    assert model_of(rank).seen == []


def test_a_copy_that_fails_midway_gives_back_what_it_took(
    rank: Rank, arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = publish(arena, 1000, seed=1)
    second, _ = publish(arena, 1000, seed=2)
    real = rank.reader.copy_out
    calls = 0

    def reused_while_copying(desc: TensorDescriptor, *args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:  # the second image's pixel_values: the sidecar gave up and reused the extent
            raise StaleDescriptor("changed while it was copied")
        return real(desc, *args, **kwargs)

    monkeypatch.setattr(rank.reader, "copy_out", reused_while_copying)
    with pytest.raises(HandoffError) as info:
        rank.issue(Copy("r1", [first, second]))
    assert str(info.value) == DESCRIPTOR_ERROR and "changed while it was copied" in info.value.detail
    stats = rank.staging.stats
    assert "r1" not in rank.staged
    assert (stats.held, stats.still_shared) == (0, 0)
    assert stats.free_bytes == stats.owned_bytes > 0  # both pixel_values buffers came back


def test_when_another_rank_fails_the_copies_made_here_go_back_to_the_pool(
    rank: Rank, arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    descs, _ = publish(arena, 1000)
    monkeypatch.setattr(rank, "_agree", lambda ok, refused, sums: (False, [], []))
    with pytest.raises(HandoffError, match="another rank"):
        rank.issue(Copy("r1", [descs, descs]))
    stats = rank.staging.stats
    assert "r1" not in rank.staged
    # Reusable, not merely forgotten: no view of them outlived the failed handoff.
    assert (stats.held, stats.still_shared) == (0, 0) and stats.free_bytes == stats.owned_bytes > 0


def test_drop_a_repeated_id_and_stop_give_everything_back(rank: Rank, arena: Arena) -> None:
    a, _ = publish(arena, 1000, seed=1)
    b, _ = publish(arena, 1000, seed=2)
    rank.issue(Copy("r1", [a]))
    rank.issue(Copy("r1", [b]))  # the same id again replaces what it had staged
    assert rank.staging.stats.held == 1
    rank.issue(Drop("r1"))
    assert rank.staging.stats.held == 0
    rank.issue(Copy("r2", [a]))
    rank.issue(Stop())
    stats = rank.staging.stats
    assert not rank.staged and stats.held == 0 and stats.owned_bytes == 0


def test_copies_go_unpooled_when_the_pool_is_full(tmp_path: Path, arena: Arena) -> None:
    rank = Rank(model=RecordingModel(), shm_dir=str(tmp_path), world=1, rank=0, staging=StagingPool(5 * MiB))  # type: ignore[arg-type]
    try:
        a, arrays = publish(arena, 1000, seed=1)  # 4.7 MB: one pooled buffer
        b, _ = publish(arena, 1000, seed=2)
        rank.issue(Copy("r1", [a]))
        rank.issue(Copy("r2", [b]))
        stats = rank.staging.stats
        assert stats.owned_bytes <= 5 * MiB and stats.unpooled >= 1
        assert np.array_equal(rank.staged["r1"][0]["pixel_values"].numpy(), arrays["pixel_values"])
        rank.issue(Drop("r1"))
        rank.issue(Drop("r2"))
        assert rank.staging.stats.held == 0
    finally:
        rank.reader.close()


def _with_generation(desc: TensorDescriptor, generation: int, key: bytes) -> TensorDescriptor:
    return dataclasses.replace(desc, generation=generation).signed(key)


# -- two ranks ------------------------------------------------------------------------------------------


def _rank_main(rank: int, port: int, links: list[Any], shm_dirs: list[str], jobs: list[Any], results: Any) -> None:  # noqa: PLR0917
    """Rank 0 issues `jobs` ((request, descriptor lists)) and reports; rank 1 follows."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S))
    state = Rank(model=RecordingModel(), shm_dir=shm_dirs[rank], world=2, rank=rank, links=links)  # type: ignore[arg-type]
    try:
        if rank:
            state.follow()
            results.put(("rank1", state.staging.stats.held, len(state.staged)))
            return
        for request, images in jobs:
            try:
                sums = state.issue(Copy(request, images, checksums=True))
                results.put((request, "ok", sums, state.staging.stats.held))
            except HandoffError as exc:
                results.put((request, "failed", (str(exc), exc.refused, exc.detail), state.staging.stats.held))
            state.issue(Drop(request))
        state.issue(Stop())
    finally:
        state.reader.close()
        dist.destroy_process_group()


def _run_two_ranks(shm_dirs: list[str], jobs: list[Any]) -> dict[str, Any]:
    results = SPAWN.Queue()
    port = free_port()
    leader, follower = SPAWN.Pipe(duplex=True)
    procs = [
        SPAWN.Process(target=_rank_main, args=(r, port, links, shm_dirs, jobs, results))
        for r, links in enumerate(([leader], [follower]))
    ]
    for p in procs:
        p.start()
    leader.close()
    follower.close()
    try:
        got = {}
        for _ in range(len(jobs) + 1):
            item = results.get(timeout=TIMEOUT_S)
            got[item[0]] = item[1:]
        for p in procs:
            p.join(TIMEOUT_S)
            assert p.exitcode == 0
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_two_ranks_copy_the_same_bytes_and_rank_0_gathers_their_checksums(tmp_path: Path, arena: Arena) -> None:
    one, arrays = publish(arena, 1000)
    many = [publish(arena, 2, seed=i)[0] for i in range(200)]  # a command of 17 kB
    got = _run_two_ranks([str(tmp_path), str(tmp_path)], [("one", [one]), ("many", many)])
    expected = {n: checksum(torch.from_numpy(a)) for n, a in arrays.items()}
    status, sums, held = got["one"]
    assert status == "ok" and held == 1
    assert sums == [[expected], [expected]]  # rank 0's and rank 1's copies
    status, sums, _ = got["many"]
    assert status == "ok" and len(sums) == 2 and sums[0] == sums[1] and len(sums[0]) == 200
    assert got["rank1"] == (0, 0)  # rank 1 gave every buffer back and holds nothing at Stop


def test_when_one_rank_cannot_read_every_rank_drops_its_copy(tmp_path: Path, arena: Arena) -> None:
    descs, _ = publish(arena, 1000)
    elsewhere = tmp_path / "elsewhere"  # rank 1 looks for the segment in an empty directory
    elsewhere.mkdir()
    got = _run_two_ranks([str(tmp_path), str(elsewhere)], [("r1", [descs])])
    status, (message, refused, detail), held = got["r1"]
    # Rank 1 refused the descriptor (no such segment there): the answer is the fixed message, and
    # rank 0's log line says which rank.
    assert status == "failed" and message == DESCRIPTOR_ERROR and refused
    assert "another rank (1) refused a descriptor" in detail
    assert held == 0  # rank 0 copied, then gave its buffer back when the ranks disagreed
    assert got["rank1"] == (0, 0)


def test_two_ranks_refuse_a_forged_descriptor_and_go_on_serving(tmp_path: Path, arena: Arena) -> None:
    victim, arrays = publish(arena, 1000, seed=3)
    forged = {n: d.signed(secrets.token_bytes(32)) for n, d in victim.items()}
    got = _run_two_ranks([str(tmp_path), str(tmp_path)], [("forged", [forged]), ("genuine", [victim])])
    status, (message, refused, detail), held = got["forged"]
    assert status == "failed" and message == DESCRIPTOR_ERROR and refused
    assert "rank 0: " in detail and "MAC does not verify" in detail
    assert held == 0
    # Same extent, the sidecar's own MAC: both ranks read it (the forgery was refused for its MAC alone).
    status, sums, _ = got["genuine"]
    expected = {n: checksum(torch.from_numpy(a)) for n, a in arrays.items()}
    assert status == "ok" and sums == [[expected], [expected]]
    assert got["rank1"] == (0, 0)


def test_a_rank_needs_one_link_per_peer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs 1 link"):
        Rank(model=RecordingModel(), shm_dir=str(tmp_path), world=2, rank=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 0 link"):
        Rank(model=RecordingModel(), shm_dir=str(tmp_path), world=1, rank=0, links=[object()])  # type: ignore[arg-type, list-item]


def test_a_follower_stops_when_rank_0_goes_away(tmp_path: Path) -> None:
    leader, follower = SPAWN.Pipe(duplex=True)
    rank = Rank(model=RecordingModel(), shm_dir=str(tmp_path), world=2, rank=1, links=[follower])  # type: ignore[arg-type]
    leader.close()
    rank.follow()  # returns instead of waiting forever
    rank.reader.close()
