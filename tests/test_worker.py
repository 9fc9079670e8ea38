"""The worker: inputs staged in the extent, the heap policy (RSS does not stay at the largest
image, and ordinary images pay no trim), and start-up with a processor that does not load.

Heap measurements run in spawned children (a fresh process each), never in pytest's own process,
whose heap every other test has already shaped.
"""

from __future__ import annotations

import asyncio
import base64
import io
import multiprocessing
import os
import shutil
import signal
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from preprocess import worker
from preprocess.arena import Arena, segment_name
from preprocess.cost import output_nbytes, output_shapes
from preprocess.extents import reservation_size
from preprocess.pipeline import ImagePipeline
from preprocess.pool import PoolError, WorkerPool, WorkerUnavailable
from preprocess.processors import CONFIG_NAME, read_spec, resolve_processor
from preprocess.protocol import TensorDescriptor
from preprocess.worker import (
    HEAP_SLACK,
    HeapKeeper,
    ImageTask,
    Shapes,
    Staged,
    WorkerSetup,
    WorkerState,
    process_image,
    stage,
)

SPAWN = multiprocessing.get_context("spawn")
MiB = 1 << 20
OUTPUT: Shapes = {"pixel_values": ((4, 4), "float32")}
# Room for what is allocated between the worker's own reading and ours (the result's pickling, the
# pipe): a few hundred KiB, with margin.
READING_MARGIN = 8 * MiB

_pinned: list[bytes] = []


class _HoardingProcessor:
    """An image processor whose intermediates stay in glibc's heap after the image is done.

    It fills `hoard_mib` 1 MiB blocks (below glibc's mmap threshold: heap, not mmap), keeps the last
    one alive as a long-lived object would (so the heap top cannot shrink by itself), and frees the
    rest: what a big image leaves in a worker that does not trim. `fail` raises after hoarding, as a
    processor that rejects an image late would.
    """

    def __init__(self) -> None:
        self.hoard_mib = 0
        self.fail = False

    def __call__(self, images: Any, return_tensors: str) -> dict[str, np.ndarray]:
        blocks = [bytes([i % 251 + 1]) * MiB for i in range(self.hoard_mib)]  # filled: resident
        if blocks:
            _pinned.append(blocks.pop())
        del blocks
        if self.fail:
            raise ValueError("rejected late")
        return {"pixel_values": np.zeros((4, 4), np.float32)}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


class _SizeProcessor:
    """Records the size of the image it was given; outputs a constant tensor."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, images: Image.Image, return_tensors: str) -> dict[str, np.ndarray]:
        self.sizes.append(images.size)
        return {"pixel_values": np.full((4, 4), 7.0, np.float32)}


def test_inputs_are_staged_in_the_extent_when_they_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arena = Arena.create(segment_name(f"stage-{uuid.uuid4().hex[:8]}"), 4 * MiB, directory=str(tmp_path))
    processor = _SizeProcessor()
    state = WorkerState(processor, arena, HeapKeeper())
    png = _png()
    text = base64.b64encode(png).decode()
    try:
        extent = arena.reserve(64 * 1024)
        assert extent is not None
        for data in (text, png):
            payload = stage(arena, extent, data)
            assert payload == Staged(len(data), isinstance(data, str))
            result = process_image(state, ImageTask(payload, extent, OUTPUT))
            assert processor.sizes.pop() == (32, 24)
            # The outputs overwrote the staged input at the start of the extent.
            desc = TensorDescriptor.from_json(result.tensors["pixel_values"])
            assert desc.offset == extent.offset
            assert np.array_equal(arena.ndarray_view(extent, 0, "float32", (4, 4)), np.full((4, 4), 7.0))

        # Not staged (travel in the task, as before): larger than the extent, or than STAGE_MAX, or
        # text that is not ASCII (and so not base64 either).
        assert stage(arena, extent, "A" * (extent.capacity + 4)) == "A" * (extent.capacity + 4)
        monkeypatch.setattr(worker, "STAGE_MAX", len(png) - 1)
        assert stage(arena, extent, png) is png
        monkeypatch.undo()
        assert stage(arena, extent, text + "é") == text + "é"
        with pytest.raises(ValueError, match="invalid base64 data"):
            process_image(state, ImageTask(text + "é", extent, OUTPUT))

        # Bad base64 is reported the same way staged or not.
        for bad in ("!!!!", text[:-3]):
            payload = stage(arena, extent, bad)
            assert isinstance(payload, Staged)
            with pytest.raises(ValueError, match="invalid base64 data"):
                process_image(state, ImageTask(payload, extent, OUTPUT))
        assert processor.sizes == []
        arena.free(extent)
    finally:
        arena.close()  # raises if a view into the arena was left alive


def _hoard_in_child(directory: str, slack: int) -> list[tuple[str, bool, int, int]]:
    """Runs in a spawned process: (step, trimmed, anonymous RSS after, floor after) per image."""
    # A warm worker has freed mmapped blocks of up to 32 MiB, which raises glibc's mmap threshold
    # (dynamically, to the freed size): later blocks of that size come from the heap. Do the same.
    del_me = b"w" * (16 * MiB)
    del del_me
    arena = Arena.create(segment_name(f"heap-{uuid.uuid4().hex[:8]}"), 4 * MiB, directory=directory)
    processor = _HoardingProcessor()
    state = WorkerState(processor, arena, HeapKeeper(slack))
    extent = arena.reserve(reservation_size(64))
    assert extent is not None
    task = ImageTask(_png(), extent, OUTPUT)
    steps: list[tuple[str, bool, int, int]] = []

    def step(name: str, hoard_mib: int, fail: bool = False) -> None:
        processor.hoard_mib, processor.fail = hoard_mib, fail
        trims = state.heap.trims
        try:
            trimmed = process_image(state, task).heap_trimmed
        except ValueError:
            trimmed = state.heap.trims > trims
        assert state.heap.floor is not None
        steps.append((name, trimmed, state.heap.anon_rss(), state.heap.floor))

    step("first", 0)
    step("small", 4)
    step("largest", 256)
    step("small after largest", 4)
    step("largest, failing", 256, fail=True)
    arena.close()
    return steps


@pytest.mark.parametrize("policy", ["slack", "never"])
def test_rss_does_not_stay_at_the_largest_image(tmp_path: Path, policy: str) -> None:
    # "never": a slack no image reaches, as if the worker did not trim: proves that the scenario
    # really leaves the largest image's heap behind, so the "slack" run shows the policy at work.
    slack = HEAP_SLACK if policy == "slack" else 1 << 40
    with ProcessPoolExecutor(1, mp_context=SPAWN) as pool:
        steps = pool.submit(_hoard_in_child, str(tmp_path), slack).result(120)
    by_name = {name: (trimmed, anon, floor) for name, trimmed, anon, floor in steps}
    first_anon = by_name["first"][1]
    assert by_name["first"][0], "the first image always trims: it sets the floor"
    assert not by_name["small"][0], "an image that leaves less than the slack pays no trim"
    if policy == "never":
        assert by_name["largest"][1] > first_anon + 200 * MiB
        assert by_name["small after largest"][1] > first_anon + 200 * MiB
        return
    for name, _trimmed, anon, floor in steps:
        assert anon <= floor + HEAP_SLACK, f"{name}: anonymous RSS {anon / MiB:.0f} MiB, floor {floor / MiB:.0f} MiB"
    # The largest image and the failing one each left 255 MiB (over the slack): both trimmed, back
    # near the first image's level (plus the 1 MiB blocks they pinned).
    for name in ("largest", "largest, failing"):
        trimmed, anon, _floor = by_name[name]
        assert trimmed, name
        assert anon <= first_anon + 16 * MiB, f"{name}: {anon / MiB:.0f} MiB vs {first_anon / MiB:.0f} MiB first"
    assert not by_name["small after largest"][0]


def _anon_rss(pid: int) -> int:
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return (int(fields[1]) - int(fields[2])) * 4096


def _photo(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width * 3, dtype=np.float32).reshape(1, width, 3)
    pixels = np.clip(base + rng.normal(0, 20, (height, 1, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).copy()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def test_real_worker_trims_once_then_holds_its_heap_within_the_slack() -> None:
    """Real worker, real qwen2-vl processor: a run of same-size images pays one trim (the first)."""
    spec = read_spec(resolve_processor("qwen2-vl"))
    width, height = 1280, 720
    nbytes = output_nbytes(spec, width, height)
    pipeline = ImagePipeline(
        processor="qwen2-vl",
        workers=1,
        task_timeout_s=60,
        instance=f"test-{uuid.uuid4().hex[:8]}",
        directory="/dev/shm",
        size=2 * reservation_size(nbytes),
    )
    await pipeline.start()
    try:
        assert pipeline.pool is not None
        (pid,) = pipeline.pool.pids()
        trimmed: list[bool] = []
        anon: list[int] = []
        for seed in range(4):
            hold = pipeline.reserve(nbytes)
            assert hold is not None
            try:
                done = await pipeline.process(hold, _photo(width, height, seed), output_shapes(spec, width, height))
            finally:
                hold.release()
            trimmed.append(done.result.heap_trimmed)
            anon.append(_anon_rss(pid))
        assert trimmed == [True, False, False, False]
        assert max(anon) <= anon[0] + HEAP_SLACK + READING_MARGIN
    finally:
        await asyncio.wait_for(pipeline.close(), 30)


# -- start-up with a processor that does not load -------------------------------------------------

# What transformers says about a preprocessor_config.json that is not JSON.
NOT_JSON = r"OSError: It looks like the config file at '.*preprocessor_config\.json' is not a valid JSON file"


def processor_class(state: WorkerState, _task: object) -> str:
    return type(state.processor).__name__


def child_pids() -> set[int]:
    return {child.pid for child in multiprocessing.active_children() if child.pid is not None}


async def test_a_processor_that_does_not_load_fails_the_start_and_leaves_nothing(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_NAME).write_text('{"image_processor_type": "Qwen2VLImageProcessor",')  # cut short
    reasons: list[str] = []
    before = child_pids()
    pipeline = ImagePipeline(
        processor=str(broken),
        workers=1,
        task_timeout_s=10,
        instance=f"test-{uuid.uuid4().hex[:8]}",
        directory=str(tmp_path),
        size=1 << 20,
        on_restart=reasons.append,
    )
    with pytest.raises(PoolError, match="^worker failed to start: " + NOT_JSON):
        await asyncio.wait_for(pipeline.start(), 120)
    assert reasons == ["start_failed"]  # counted once: a pool that cannot start retries nothing
    assert child_pids() <= before  # no worker left behind
    assert not list(tmp_path.glob("mm-sidecar-*"))  # nor the arena


async def test_a_replacement_whose_processor_no_longer_loads_is_sent_no_task(tmp_path: Path) -> None:
    config_dir = tmp_path / "processor"
    config_dir.mkdir()
    shutil.copy(resolve_processor("qwen2-vl") / CONFIG_NAME, config_dir / CONFIG_NAME)
    arena = Arena.create(segment_name(f"start-{uuid.uuid4().hex[:8]}"), 1 << 20, directory=str(tmp_path))
    reasons: list[str] = []
    pool: WorkerPool[WorkerState, None, str] = WorkerPool(
        workers=1,
        init=WorkerSetup(str(config_dir), arena.name, str(tmp_path)),
        job=processor_class,
        task_timeout_s=30,
        on_restart=reasons.append,
    )
    await asyncio.wait_for(pool.start(), 120)
    try:
        assert await pool.run(None) == "Qwen2VLImageProcessorPil"
        (config_dir / CONFIG_NAME).write_text("{")  # from now on, the processor cannot load
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while pool.pids() in ([], [pid]):
                await asyncio.sleep(0.01)
        # Submitted while the replacement loads: it waits for that start-up, then fails with the
        # pool's error naming why, instead of being sent to a worker that will never run it.
        with pytest.raises(
            WorkerUnavailable, match="^no preprocessing worker is running: the last worker failed to start: " + NOT_JSON
        ):
            await asyncio.wait_for(pool.run(None), 120)
        assert reasons == ["exit -9", "start_failed"]
        assert pool.stats().ready == 0 and pool.stats().start_failures == 1
    finally:
        await pool.close()
        arena.close()
