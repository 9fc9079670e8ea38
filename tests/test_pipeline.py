"""The preprocessing stage end to end: real workers, real /dev/shm arena, real processors.

Each pipeline start spawns workers that import transformers, so one pipeline serves a whole test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import multiprocessing
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocess.arena import Arena, segment_name
from preprocess.cost import output_nbytes, output_shapes
from preprocess.extents import reservation_size
from preprocess.pipeline import ImagePipeline
from preprocess.pool import TaskFailed, WorkerCrashed
from preprocess.processors import decode, load_processor, read_spec, resolve_processor, run_processor
from preprocess.protocol import ArenaReader

SHM = "/dev/shm"
SPEC = read_spec(resolve_processor("qwen2-vl"))


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def corpus() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (64, 90, 4), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": encode(noise, "JPEG", quality=90),
        "progressive": encode(noise, "JPEG", progressive=True),
        "png-rgba": encode(rgba, "PNG"),
        "exif-6": encode(noise.resize((200, 120)), "JPEG", exif=exif),
        "gray-wide": encode(noise.convert("L").resize((900, 30)), "PNG"),
    }


def display_size(data: bytes) -> tuple[int, int]:
    size = decode(data).size
    return size[0], size[1]


@pytest.fixture
async def pipeline() -> AsyncIterator[ImagePipeline]:
    p = ImagePipeline(
        processor="qwen2-vl",
        workers=1,
        task_timeout_s=60,
        instance=f"test-{uuid.uuid4().hex[:8]}",
        directory=SHM,
        size=64 * 1024**2,
    )
    await p.start()
    try:
        yield p
    finally:
        await p.close()
    assert not Path(SHM, segment_name(p.instance)).exists()


async def test_outputs_in_the_arena_equal_the_processor_and_nothing_leaks(pipeline: ImagePipeline) -> None:
    processor = load_processor("qwen2-vl")
    reader = ArenaReader(SHM)
    try:
        for name, data in corpus().items():
            w, h = display_size(data)
            hold = pipeline.reserve(output_nbytes(SPEC, w, h))
            assert hold is not None
            payload: bytes | str = base64.b64encode(data).decode() if name.startswith("jpeg") else data
            done = await pipeline.process(hold, payload, output_shapes(SPEC, w, h))
            direct = run_processor(processor, decode(data))
            assert set(done.tensors) == set(direct) == {"pixel_values", "image_grid_thw"}
            for key, desc in done.tensors.items():
                got = reader.copy_out(desc).numpy()
                assert got.dtype == direct[key].dtype and np.array_equal(got, direct[key]), (name, key)
            assert done.result.decode_s > 0 and done.result.preprocess_s > 0
            hold.release()
        assert pipeline.stats()[0].extents == 0
    finally:
        reader.close()


async def test_worker_kill_cancellation_and_bad_input_free_the_extent_only_when_safe(pipeline: ImagePipeline) -> None:
    big = encode(Image.effect_noise((1920, 1080), 64).convert("RGB"), "PNG")
    expected = output_shapes(SPEC, 1920, 1080)
    need = output_nbytes(SPEC, 1920, 1080)

    # kill -9 while the worker processes the image: the extent stays reserved until the worker is dead.
    hold = pipeline.reserve(need)
    assert hold is not None
    task = asyncio.create_task(pipeline.process(hold, big, expected))
    await asyncio.sleep(0.05)
    assert pipeline.pool is not None
    (pid,) = pipeline.pool.pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        await task
    hold.release()
    assert hold.freed and pipeline.stats()[0].extents == 0
    assert pipeline.stats()[1].restarts == 1

    # The replacement worker serves the next image.
    small = encode(Image.new("RGB", (64, 64)), "PNG")
    hold = pipeline.reserve(output_nbytes(SPEC, 64, 64))
    assert hold is not None
    await pipeline.process(hold, small, output_shapes(SPEC, 64, 64))
    hold.release()

    # The client goes away while its image is processed: freed when the worker is done, not before.
    hold = pipeline.reserve(need)
    assert hold is not None
    task = asyncio.create_task(pipeline.process(hold, big, expected))
    async with asyncio.timeout(5):
        while pipeline.stats()[1].busy != 1:
            await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hold.release()
    assert not hold.freed and pipeline.stats()[0].extents == 1
    async with asyncio.timeout(60):
        while not hold.freed:
            await asyncio.sleep(0.01)
    assert pipeline.stats()[0].extents == 0

    # Bytes that are not an image, and a cost model that disagrees with the processor: clear errors.
    for data, shapes, message in (
        (b"definitely not an image", expected, "DecodeError"),
        (big, output_shapes(SPEC, 640, 480), "differ from the cost model"),
    ):
        hold = pipeline.reserve(need)
        assert hold is not None
        with pytest.raises(TaskFailed, match=message):
            await pipeline.process(hold, data, shapes)
        hold.release()
    assert pipeline.stats()[0].extents == 0
    assert reservation_size(need) <= pipeline.capacity


def _create_and_die(instance: str) -> None:
    Arena.create(segment_name(instance), 1024**2 * 4, directory=SHM)
    os._exit(0)  # no close(): the segment stays behind, as after a kill -9


async def test_start_removes_stale_segments_of_the_same_instance() -> None:
    instance = f"test-{uuid.uuid4().hex[:8]}"
    child = multiprocessing.get_context("spawn").Process(target=_create_and_die, args=(instance,))
    child.start()
    child.join(30)
    assert child.pid is not None
    stale = Path(SHM, segment_name(instance, child.pid))
    assert stale.exists()
    p = ImagePipeline(
        processor="llava-1.5", workers=1, task_timeout_s=30, instance=instance, directory=SHM, size=4 * 1024**2
    )
    await p.start()
    try:
        assert not stale.exists()
        assert Path(SHM, segment_name(instance)).exists()
    finally:
        await p.close()
