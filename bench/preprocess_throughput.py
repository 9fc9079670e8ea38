"""Images/s through the sidecar's preprocessing stage vs the bare processor in as many plain processes.

- pipeline: `preprocess.pipeline.ImagePipeline` with `--workers` worker processes (default: the
  number of cores) and an arena; each task is what offload mode sends (the image's base64 text, an
  extent, the cost model's shapes; the text copied into the extent when it fits there, else pickled
  through the pipe): base64 decode, image decode, the HF processor, outputs written into the
  extent, descriptors back; the extent is freed at once (as if the engine acked at once).
  Up to 2 tasks per worker are in flight, so a worker never waits for the next task.
- plain: the same number of spawned processes, each with the same processor loaded, each given its
  share of the same base64 texts up front, doing base64 decode + `decode` + `run_processor` and nothing
  else (outputs dropped). The clock starts when every process is loaded and told to go.
- plain + heap policy: as many more plain processes, also running the workers' heap policy after each
  image (`preprocess.worker.HeapKeeper`: read the anonymous RSS, malloc_trim only past the slack),
  to price that policy alone.

All three are started (processors loaded) before any is timed, and each batch is timed `--rounds`
times per variant, interleaved: round r runs the variants in rotated order, so a slow spell of a
shared machine falls on all of them. Rates are from each variant's median round; every row also lists
pipeline / plain round by round. Workers and plain processes alike use the fast path where it covers
the processor (`--fast-path on`, the default, as `preprocess.fast_path`), so pipeline / plain stays
the price of the pipeline itself.

Fast path vs transformers (a second table): one process pinned to one CPU (OMP/MKL/OpenBLAS threads 1)
times, image by image and interleaved (the order alternates every image), `decode` + the transformers
processor against `decode` + the fast path the workers would use (`preprocess.worker.FAST_PATHS`:
`preprocess.fastpath` for Qwen2-VL, `preprocess.fastpath_clip` for CLIP and SigLIP) writing into an
arena extent, for each of `--fast-presets` (`<preset>/default` is the preset at transformers' default
min/max_pixels; by default `--presets` plus llava-1.5 and siglip) and `--fast-sizes`. It also times
the steps on their own: decode, PIL's resize (transformers' call), the fast path's compiled resize
(bit-identical to it: preprocess/kernels.py; for CLIP, to the size before its crop), and the rest of
the fast path. Decode is the floor under both variants ('bound').

    .venv/bin/python -m bench.preprocess_throughput
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocess.worker import FAST_PATHS, HEAP_SLACK, STAGE_MAX, HeapKeeper, fast_path_for

from . import services
from .common import MiB
from .cpu import CpuLoad, nproc
from .images import photo_jpeg
from .report import append_results, base_parser, command_line, plot_path, save_plot
from .stats import fine_size, markdown_table, size, verdict

TARGET_RATIO = 0.9
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "12MP": (4032, 3024)}
FAST_TARGET = 3.0  # issue 15: decode + fast path >= 3x decode + transformers, one core
FAST_EXTRA = ("llava-1.5", "siglip")  # always in the default --fast-presets: the CLIP / SigLIP fast path


@dataclass(frozen=True)
class Round:
    """One timed batch of one variant."""

    wall_s: float
    busy_s: float  # summed over the processes: decode (base64 included) + processor (+ arena write)
    trims: int  # images after which the process trimmed its heap
    staged: int = 0  # images whose base64 text reached the worker in their extent (preprocess.worker.stage)


@dataclass
class RowResult:
    preset: str
    size: str
    images: int
    workers: int
    out_bytes: int
    pipeline: list[Round]
    plain: list[Round]
    policy: list[Round]  # plain processes that also run the workers' heap policy (HeapKeeper)

    def _rate(self, rounds: list[Round]) -> float:
        return self.images / statistics.median(r.wall_s for r in rounds)

    def _busy(self, rounds: list[Round]) -> float:
        return sum(r.busy_s for r in rounds) / (sum(r.wall_s for r in rounds) * self.workers)

    @property
    def pipeline_rate(self) -> float:
        return self._rate(self.pipeline)

    @property
    def plain_rate(self) -> float:
        return self._rate(self.plain)

    @property
    def policy_rate(self) -> float:
        return self._rate(self.policy)

    @property
    def ratio(self) -> float:
        return self.pipeline_rate / self.plain_rate

    @property
    def round_ratios(self) -> list[float]:
        return [q.wall_s / p.wall_s for p, q in zip(self.pipeline, self.plain, strict=True)]

    @property
    def pipeline_busy(self) -> float:
        return self._busy(self.pipeline)

    @property
    def plain_busy(self) -> float:
        return self._busy(self.plain)


class Scratch:
    """A reused, pre-touched buffer standing in for the arena extents a worker writes the fast path into."""

    def __init__(self) -> None:
        import numpy as np  # noqa: PLC0415

        self._np = np
        self._buf = np.ones(0, np.uint8)

    def views(self, shapes: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Any]:
        np = self._np
        sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in shapes.values()]
        offsets = [sum(sizes[:i]) + 64 * i for i in range(len(sizes))]
        if offsets[-1] + sizes[-1] > self._buf.nbytes:
            self._buf = np.ones(offsets[-1] + sizes[-1], np.uint8)  # written: resident, as the arena is
        return {
            name: self._buf[off : off + n].view(dtype).reshape(shape)
            for (name, (shape, dtype)), off, n in zip(shapes.items(), offsets, sizes, strict=True)
        }


def _plain_main(preset: str, conn: Any, trim: bool, fast_path: bool = True) -> None:
    import binascii  # noqa: PLC0415

    from preprocess.processors import decode, load_processor, run_processor  # noqa: PLC0415

    heap = HeapKeeper() if trim else None
    processor = load_processor(preset)
    fast = fast_path_for(processor) if fast_path else None
    scratch = Scratch()
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the parent is gone
        if message is None:
            return
        texts: list[str] = message
        conn.send("loaded")
        if conn.recv() != "go":
            return
        busy = 0.0
        trims = 0
        for text in texts:
            started = time.perf_counter()
            image = decode(binascii.a2b_base64(text.encode("ascii"), strict_mode=True))
            if fast is not None and fast.accepts(image):  # what a worker does (preprocess.worker)
                fast.write(image, scratch.views(fast.output_shapes(image.width, image.height)))
            else:
                outputs = run_processor(processor, image)
                del outputs
            busy += time.perf_counter() - started
            del image
            if heap is not None:
                trims += heap.after_image()
        conn.send(("done", busy, trims))


class Plain:
    """`workers` plain processes with `preset` loaded."""

    def __init__(self, preset: str, workers: int, *, trim: bool = False, fast_path: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_plain_main, args=(preset, child, trim, fast_path), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            for conn in self.conns:
                if not conn.poll(120):
                    raise RuntimeError("a plain process did not load its processor in 120 s")
                assert conn.recv() == "ready"
        except BaseException:
            self.close()
            raise

    def run(self, texts: Sequence[str]) -> tuple[float, float, int]:
        """(wall seconds, seconds the processes spent decoding and processing, heap trims), summed."""
        shares = [list(texts[i :: len(self.conns)]) for i in range(len(self.conns))]
        for conn, share in zip(self.conns, shares, strict=True):
            conn.send(share)
        for conn in self.conns:
            assert conn.recv() == "loaded"
        started = time.perf_counter()
        for conn in self.conns:
            conn.send("go")
        busy = 0.0
        trims = 0
        for conn in self.conns:
            if not conn.poll(600):
                raise RuntimeError("a plain process took more than 600 s")
            kind, seconds, trimmed = conn.recv()
            assert kind == "done"
            busy += seconds
            trims += trimmed
        return time.perf_counter() - started, busy, trims

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()


async def _interleaved(
    preset: str,
    workers: int,
    batches: dict[str, list[str]],
    dims: dict[str, tuple[int, int]],
    *,
    instance: str,
    rounds: int,
    plains: dict[str, Plain],
    fast_path: bool,
) -> dict[str, dict[str, list[Round]]]:
    """label -> variant -> its rounds: one ImagePipeline (processor loaded once) and the loaded plain processes.

    A plain batch runs in a thread while the pipeline's workers wait for tasks, and the other way round.
    """
    from preprocess.cost import output_nbytes, output_shapes  # noqa: PLC0415
    from preprocess.extents import reservation_size  # noqa: PLC0415
    from preprocess.pipeline import ImagePipeline  # noqa: PLC0415
    from preprocess.processors import read_spec, resolve_processor  # noqa: PLC0415

    spec = read_spec(resolve_processor(preset))
    in_flight = 2 * workers
    shapes = {label: output_shapes(spec, *dims[label]) for label in batches}
    # what the sidecar reserves per image (sidecar/classify.py)
    need = {label: reservation_size(output_nbytes(spec, *dims[label])) for label in batches}
    arena_size = in_flight * max(need.values()) + 4 * MiB
    pipeline = ImagePipeline(
        processor=preset,
        workers=workers,
        task_timeout_s=300,
        instance=instance,
        directory="/dev/shm",
        size=arena_size,
        fast_path=fast_path,
    )
    out: dict[str, dict[str, list[Round]]] = {}
    await pipeline.start()
    try:
        for label, texts in batches.items():
            slots = asyncio.Semaphore(in_flight)

            async def one(text: str, label: str = label, slots: asyncio.Semaphore = slots) -> tuple[float, bool, bool]:
                async with slots:
                    hold = pipeline.reserve(need[label])
                    assert hold is not None, "the arena is sized for every task in flight"
                    staged = len(text) <= min(hold.extent.capacity, STAGE_MAX)  # as stage() decides
                    try:
                        done = await pipeline.process(hold, text, shapes[label])
                    finally:
                        hold.release()
                    r = done.result
                    return r.decode_s + r.preprocess_s, r.heap_trimmed, staged  # preprocess_s: write included

            async def piped(texts: list[str] = texts) -> Round:
                started = time.perf_counter()
                done = await asyncio.gather(*(one(t) for t in texts))
                wall = time.perf_counter() - started
                return Round(wall, sum(d[0] for d in done), sum(d[1] for d in done), sum(d[2] for d in done))

            async def plain(proc: Plain, texts: list[str] = texts) -> Round:
                return Round(*await asyncio.to_thread(proc.run, texts))

            # warm-up: one task per process (the first call in a process pays for lazy imports)
            await asyncio.gather(*(one(texts[0]) for _ in range(workers)))
            for proc in plains.values():
                await asyncio.to_thread(proc.run, [texts[0]] * workers)
            variants = ["pipeline", *plains]
            got: dict[str, list[Round]] = {name: [] for name in variants}
            for n in range(rounds):
                for name in variants[n % len(variants) :] + variants[: n % len(variants)]:
                    got[name].append(await (piped() if name == "pipeline" else plain(plains[name])))
            out[label] = got
    finally:
        await pipeline.close()
    return out


def run_preset(
    preset: str,
    workers: int,
    batches: dict[str, list[str]],
    dims: dict[str, tuple[int, int]],
    *,
    instance: str,
    rounds: int,
    fast_path: bool = True,
) -> dict[str, dict[str, list[Round]]]:
    with contextlib.ExitStack() as stack:
        plains: dict[str, Plain] = {}
        for name, trim in (("plain", False), ("policy", True)):
            plains[name] = Plain(preset, workers, trim=trim, fast_path=fast_path)
            stack.callback(plains[name].close)
        return asyncio.run(
            _interleaved(
                preset, workers, batches, dims, instance=instance, rounds=rounds, plains=plains, fast_path=fast_path
            )
        )


# -- fast path vs transformers, one core ---------------------------------------------------------------


@dataclass
class FastRow:
    """One processor and size: per-image seconds of both variants (paired), and of the steps alone."""

    processor: str
    size: str
    pixels: str = "float32"  # the fast path's output dtype (preprocess.transport_dtype)
    resized: tuple[int, int] = (0, 0)  # (width, height) the processor resizes to
    cropped: tuple[int, int] | None = None  # (width, height) of its center crop after that, if any
    out_bytes: int = 0
    transformers: list[float] = field(default_factory=list)  # decode + the transformers processor
    fast: list[float] = field(default_factory=list)  # decode + the fast path into an arena extent
    decode: list[float] = field(default_factory=list)
    resize: list[float] = field(default_factory=list)  # PIL's resize call alone (what transformers makes)
    kernel_resize: list[float] = field(default_factory=list)  # the fast path's resize alone (preprocess.kernels)
    fast_write: list[float] = field(default_factory=list)  # the fast path alone, resize included
    kernel: str = ""  # the fast path's compiled loops ("avx2", "scalar"), or why it runs numpy and PIL
    not_covered: str = ""

    @property
    def speedup(self) -> float:
        """Median over images of the paired ratio (the two variants ran back to back on each image)."""
        return statistics.median(t / f for t, f in zip(self.transformers, self.fast, strict=True))

    @property
    def bound(self) -> float:
        """The speedup if everything after the decode were free (paired per image, median)."""
        return statistics.median(t / d for t, d in zip(self.transformers, self.decode, strict=True))


def _processor_dir(name: str, tmp: str) -> str:
    """A preset, or `<preset>/default`: that preset's config without min/max_pixels (transformers' defaults)."""
    import json  # noqa: PLC0415

    from preprocess.processors import CONFIG_NAME, resolve_processor  # noqa: PLC0415

    preset, _, variant = name.partition("/")
    if not variant:
        return preset
    if variant != "default":
        raise ValueError(f"--fast-presets: {name!r}: only <preset>/default is known")
    config = json.loads((resolve_processor(preset) / CONFIG_NAME).read_text())
    for key in ("min_pixels", "max_pixels", "size"):
        config.pop(key, None)
    directory = Path(tmp) / name.replace("/", "-")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    return str(directory)


def _compare_main(
    name: str, jobs: dict[str, list[bytes]], rounds: int, cpu: int, conn: Any, *, pixels: Sequence[str] = ("float32",)
) -> None:
    """One process, one CPU: decode + transformers vs decode + fast path, image by image, for each
    transport dtype in `pixels` (the fast path's output; transformers' float32 call is the baseline of
    every row: what an engine's API process runs); results to `conn`."""
    import tempfile  # noqa: PLC0415

    from preprocess.fastpath import NotCovered  # noqa: PLC0415
    from preprocess.processors import load_processor  # noqa: PLC0415

    os.sched_setaffinity(0, {cpu})
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor(_processor_dir(name, tmp))
    out: list[FastRow] = []
    for px in pixels:
        rows = {label: FastRow(name, label, px) for label in jobs}
        out.extend(rows.values())
        # The registry the workers try, in their order (preprocess.worker.fast_path_for, with the reasons kept).
        fast: Any = None
        refusals = []
        for kind in FAST_PATHS:
            try:
                fast = kind.for_processor(processor, pixels=px)
                break
            except NotCovered as exc:
                refusals.append(f"{kind.__name__}: {exc}")
        if fast is None:
            for row in rows.values():
                row.not_covered = "; ".join(refusals)
            continue
        _compare_one(fast, processor, jobs, rows, rounds)
    conn.send(out)


def _compare_one(
    fast: Any, processor: Any, jobs: dict[str, list[bytes]], rows: dict[str, FastRow], rounds: int
) -> None:
    """`_compare_main`'s timings for one fast path (one transport dtype) into `rows`."""
    from preprocess import kernels  # noqa: PLC0415
    from preprocess.arena import Arena, segment_name  # noqa: PLC0415
    from preprocess.extents import pack_tensors, reservation_size  # noqa: PLC0415
    from preprocess.processors import decode, run_processor  # noqa: PLC0415
    from preprocess.protocol import NUMPY_DTYPES, segment_size_for  # noqa: PLC0415

    clock = time.perf_counter

    def itemsize(dtype: str) -> int:
        return int(NUMPY_DTYPES[dtype].itemsize)  # bfloat16 included (numpy has none)

    first = {label: decode(datas[0]) for label, datas in jobs.items()}
    shapes = {label: fast.output_shapes(*image.size) for label, image in first.items()}
    packed = {
        label: pack_tensors([math.prod(dims) * itemsize(dtype) for dims, dtype in v.values()])
        for label, v in shapes.items()
    }
    largest = max(total for _, total in packed.values())
    arena = Arena.create(segment_name(f"fastbench-{os.getpid()}"), segment_size_for(reservation_size(largest)))
    try:
        extent = arena.reserve(largest)  # one extent, reused: its pages stay mapped, as a worker's arena does
        assert extent is not None

        def transformers(data: bytes) -> float:
            started = clock()
            outputs = run_processor(processor, decode(data))
            took = clock() - started
            del outputs
            return took

        def fast_path(data: bytes) -> float:
            started = clock()
            image = decode(data)
            shape = fast.output_shapes(image.width, image.height)
            offsets, _ = pack_tensors([math.prod(dims) * itemsize(dtype) for dims, dtype in shape.values()])
            views = {
                key: arena.ndarray_view(extent, offset, dtype, dims)
                for (key, (dims, dtype)), offset in zip(shape.items(), offsets, strict=True)
            }
            fast.write(image, views)  # as preprocess.worker does
            took = clock() - started
            views.clear()
            return took

        for label, datas in jobs.items():
            row = rows[label]
            # (height, width) before any crop: the size of the PIL resize call, which the steps time alone
            h, w = fast.resized_size(first[label].width, first[label].height)
            row.resized, row.out_bytes = (w, h), packed[label][1]
            crop = getattr(fast, "crop_hw", None)
            row.cropped = None if crop is None else (crop[1], crop[0])
            kernel = fast.kernel
            row.kernel = f"{kernel.simd}, Pillow order {kernel.order}" if kernel else kernels.unavailable()

            # what the fast path resizes: the whole image, or only its center crop (CLIP)
            window = None if crop is None else fast.crop_window(first[label].width, first[label].height)

            def steps(
                data: bytes,
                row: FastRow = row,
                size: tuple[int, int] = (w, h),
                kernel: Any = kernel,
                window: tuple[int, int, int, int] | None = window,
            ) -> None:
                """The steps timed one by one: decode, PIL's resize alone, the fast path's resize alone
                (the compiled one; PIL's where it runs numpy), the fast path."""
                started = clock()
                image = decode(data)
                row.decode.append(clock() - started)
                started = clock()
                if image.size != size:
                    image.resize(size, resample=fast.resample, reducing_gap=None)
                row.resize.append(clock() - started)
                started = clock()
                if image.size != size:
                    if kernel is not None and fast.resample in kernels.FILTERS:
                        kernel.resize(image, *size, fast.resample, window)
                    else:
                        image.resize(size, resample=fast.resample, reducing_gap=None)
                row.kernel_resize.append(clock() - started)
                shape = fast.output_shapes(image.width, image.height)
                offsets, _ = pack_tensors([math.prod(dims) * itemsize(dtype) for dims, dtype in shape.values()])
                views = {
                    key: arena.ndarray_view(extent, offset, dtype, dims)
                    for (key, (dims, dtype)), offset in zip(shape.items(), offsets, strict=True)
                }
                started = clock()
                fast.write(image, views)
                row.fast_write.append(clock() - started)
                views.clear()

            transformers(datas[0])  # warm-up: lazy imports, first-touch of the allocator's arenas
            fast_path(datas[0])
            variants = [
                lambda data, row=row: row.transformers.append(transformers(data)),
                lambda data, row=row: row.fast.append(fast_path(data)),
                steps,
            ]
            for r in range(rounds):
                for i, data in enumerate(datas):
                    # All three on the same image back to back, in rotated order: a slow spell of a
                    # shared machine falls on all of them.
                    k = (r + i) % len(variants)
                    for run in variants[k:] + variants[:k]:
                        run(data)
        arena.free(extent)
    finally:
        arena.close()


def compare(
    names: Sequence[str], jobs: dict[str, list[bytes]], rounds: int, pixels: Sequence[str] = ("float32",)
) -> list[FastRow]:
    """Run `_compare_main` for each processor in a fresh spawned process on the last allowed CPU."""
    ctx = multiprocessing.get_context("spawn")
    cpu = max(os.sched_getaffinity(0))
    threads = {var: "1" for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    saved = {var: os.environ.get(var) for var in threads}
    out: list[FastRow] = []
    os.environ.update(threads)  # read by the child at start-up (spawn)
    try:
        for name in names:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_compare_main, args=(name, jobs, rounds, cpu, child), kwargs={"pixels": pixels}, daemon=True
            )
            proc.start()
            child.close()
            try:
                if not parent.poll(1800):
                    raise RuntimeError(f"fast path comparison for {name} took more than 30 min")
                rows: list[FastRow] = parent.recv()
            finally:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                parent.close()
            out.extend(rows)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return out


def fast_table(rows: Sequence[FastRow], images: int, rounds: int) -> tuple[str, list[str]]:
    def ms(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):.1f}"

    headers = [
        "processor",
        "image",
        "pixels",
        "resized to",
        "pixel_values per image",
        "decode + transformers ms",
        "decode + fast path ms",
        "speedup",
        f"target >= {FAST_TARGET:.0f}x",
        "decode ms",
        "PIL resize ms",
        "fast path resize ms",
        "fast path minus resize ms",
        "bound: decode only",
    ]
    table_rows: list[list[object]] = []
    targeted: list[bool] = []
    for r in rows:
        if r.not_covered:
            table_rows.append(
                [r.processor, r.size, r.pixels, "-", "-", "-", "-", "-", "not covered: transformers", *"-----"]
            )
            continue
        # The target: 720p and 1080p at the preset's own max_pixels, so the Qwen2-VL family's
        # presets as shipped; CLIP and SigLIP (a fixed output size, no max_pixels) are reported.
        target = r.processor.startswith("qwen") and "/" not in r.processor and r.size in ("720p", "1080p")
        target = target and r.pixels == "float32"
        if target:
            targeted.append(r.speedup >= FAST_TARGET)
        rest = statistics.median(w - z for w, z in zip(r.fast_write, r.kernel_resize, strict=True))
        table_rows.append(
            [
                r.processor,
                f"{r.size} {SIZES[r.size][0]}x{SIZES[r.size][1]}",
                r.pixels,
                f"{r.resized[0]}x{r.resized[1]}"
                + ("" if r.resized != SIZES[r.size] else " (no resize)")
                + ("" if r.cropped is None else f", crop {r.cropped[0]}x{r.cropped[1]}"),
                fine_size(r.out_bytes),
                ms(r.transformers),
                ms(r.fast),
                f"{r.speedup:.2f}x",
                verdict(r.speedup >= FAST_TARGET) if target else "(reported)",
                ms(r.decode),
                ms(r.resize),
                ms(r.kernel_resize),
                f"{1000 * rest:.1f}",
                f"{r.bound:.2f}x",
            ]
        )
    notes = [
        f"fast path vs transformers, one process pinned to one CPU, OMP/MKL/OpenBLAS threads 1: {images} JPEGs "
        f"(4 distinct) x {rounds} rounds per row; each image is run by both variants and by the steps one by "
        "one, back to back in rotated order; ms are medians, speedup and bound the medians of per-image ratios",
        f"target: decode + fast path >= {FAST_TARGET:.0f}x decode + transformers at 720p and 1080p, presets at their "
        "own max_pixels (the Qwen2-VL presets as shipped), float32 rows: "
        + (verdict(all(targeted)) if targeted else "not measured (no such row in this run)")
        + "; "
        "12MP rows, `<preset>/default` rows (transformers' default min/max_pixels, 3136 / 1003520, where 1080p and "
        "12MP are scaled down) and CLIP / SigLIP rows (a fixed 336 / 384 output, no max_pixels: decode is most of "
        "their time, see 'bound') are reported",
        "both variants start from the same `decode`; transformers then makes PIL's resize call ('PIL resize', "
        "timed alone), the fast path its compiled resize, bit-identical to it (preprocess/kernels.py: "
        + "; ".join(sorted({r.kernel for r in rows if r.kernel}))
        + "). 'bound' is decode + transformers over decode alone, the speedup if everything after the decode were "
        "free (for CLIP the resize is to the size before the crop). 'fast path minus resize': Qwen2-VL, the "
        "compiled patchify writing every item into the destination; CLIP / SigLIP, the crop and a table gather "
        "per channel",
        "decode + fast path writes into an arena extent (pre-touched shared memory, as a worker does); "
        "decode + transformers keeps the processor's own fresh arrays and is not copied anywhere",
        "pixels: what the fast path writes (preprocess.transport_dtype): float32, bit-identical to the processor's "
        "output; bfloat16, that rounded as torch rounds it (half the bytes); uint8, the raw patches the engine "
        "normalises (a quarter; Qwen2-VL family only). The baseline of every row is the processor's own float32 "
        "call, what an engine's API process runs for an image it preprocesses itself; the target is read on the "
        "float32 rows",
    ]
    return markdown_table(headers, table_rows), notes


def table(results: Sequence[RowResult], workers: int) -> tuple[str, list[str]]:
    headers = [
        "processor",
        "image",
        "images",
        "pixel_values per image",
        f"pipeline ({workers} workers) img/s",
        f"plain ({workers} processes) img/s",
        "pipeline / plain",
        "target >= 0.9x",
        "pipeline / plain by round",
        "plain + heap policy img/s",
        "heap trims: workers / plain + policy",
        "base64 to workers via",
        "workers busy",
        "plain busy",
    ]
    rows = []
    for r in results:
        timed = r.images * len(r.pipeline)
        staged = sum(x.staged for x in r.pipeline)
        rows.append(
            [
                r.preset,
                r.size,
                r.images,
                size(r.out_bytes),
                f"{r.pipeline_rate:.2f}",
                f"{r.plain_rate:.2f}",
                f"{r.ratio:.2f}x",
                verdict(r.ratio >= TARGET_RATIO),
                " ".join(f"{x:.2f}" for x in r.round_ratios),
                f"{r.policy_rate:.2f} ({r.policy_rate / r.plain_rate:.2f}x)",
                f"{sum(x.trims for x in r.pipeline)} / {sum(x.trims for x in r.policy)} of {timed}",
                "extent" if staged == timed else "pipe" if staged == 0 else f"extent {staged}/{timed}",
                f"{100 * r.pipeline_busy:.0f}%",
                f"{100 * r.plain_busy:.0f}%",
            ]
        )
    met = all(r.ratio >= TARGET_RATIO for r in results)
    notes = [
        f"target: pipeline >= 0.9x the plain processes on every row: {verdict(met)}",
        "busy = time the processes spent decoding (base64 included), running the processor and (workers) writing "
        "the arena, over processes x wall time; the rest of a worker's time is the task's trip (the parent "
        "dispatches a worker's next task when its previous result arrives; the base64 text goes in the task's "
        "extent when it fits there, else through the pipe) and the heap policy after each image",
        "heap policy (preprocess.worker.HeapKeeper): after each image a worker reads its anonymous RSS and "
        f"runs malloc_trim(0) only when it is more than {HEAP_SLACK // MiB} MiB above its level after its last "
        "trim (and always after its first image, here in the warm-up); 'plain + heap policy' runs the same "
        "policy in the plain processes, to price it alone; trims are counted over the timed images of all rounds",
        "base64 to workers via: 'extent' where the text fits the extent reserved for the image's outputs (and "
        f"preprocess.worker.STAGE_MAX = {STAGE_MAX // MiB} MiB), copied there by the parent instead of pickled "
        "through the pipe; the plain processes got theirs up front, outside the clock",
    ]
    return markdown_table(headers, rows), notes


def plot(results: Sequence[RowResult], path: Path, enabled: bool) -> Path | None:
    def draw(plt: Any) -> None:
        import numpy as np  # noqa: PLC0415

        _fig, ax = plt.subplots(figsize=(8, 4.2))
        x = np.arange(len(results))
        ax.bar(x - 0.2, [r.pipeline_rate for r in results], 0.4, label="ImagePipeline")
        ax.bar(x + 0.2, [r.plain_rate for r in results], 0.4, label="plain processes")
        ax.set_xticks(x, [f"{r.preset}\n{r.size}" for r in results])
        ax.set_yscale("log")
        ax.set_ylabel("images/s (log)")
        ax.legend()

    return save_plot(path, draw, enabled=enabled)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = base_parser(__doc__)
    parser.add_argument(
        "--presets", default="qwen2-vl,llava-1.5", help="processor presets (default qwen2-vl,llava-1.5)"
    )
    parser.add_argument("--sizes", default="1080p,12MP", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--images-1080p", type=int, default=32, dest="n_1080p")
    parser.add_argument("--images-12mp", type=int, default=8, dest="n_12mp")
    parser.add_argument("--workers", type=int, default=nproc(), help="workers and plain processes (default nproc)")
    parser.add_argument("--rounds", type=int, default=5, help="timed batches per variant, interleaved (default 5)")
    parser.add_argument(
        "--fast-path", choices=("on", "off"), default="on", help="workers' and plain processes' fast path (default on)"
    )
    parser.add_argument(
        "--fast-presets",
        default=None,
        help="processors for the one-core fast path vs transformers table; <preset>/default: at transformers' "
        "default min/max_pixels; '' for none (default: --presets, <preset>/default for the Qwen ones, and "
        f"{', '.join(FAST_EXTRA)})",
    )
    parser.add_argument("--fast-sizes", default="720p,1080p,12MP", help="sizes for that table (default all)")
    parser.add_argument(
        "--fast-pixels",
        default="float32,bfloat16,uint8",
        help="transport dtypes the fast path writes in that table (default float32,bfloat16,uint8)",
    )
    parser.add_argument("--fast-images", type=int, default=8, help="JPEGs per size in that table (default 8)")
    parser.add_argument("--fast-rounds", type=int, default=3, help="times each JPEG runs there (default 3)")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    labels = [s.strip() for s in args.sizes.split(",") if s.strip()]
    fast_labels = [s.strip() for s in args.fast_sizes.split(",") if s.strip()]
    if unknown := (set(labels) | set(fast_labels)) - set(SIZES):
        parser.error(f"--sizes / --fast-sizes: unknown {sorted(unknown)}")
    if args.fast_presets is None:
        fast_presets = [x for p in presets for x in ((p, f"{p}/default") if p.startswith("qwen") else (p,))]
        fast_presets += [p for p in FAST_EXTRA if p not in fast_presets]
    else:
        fast_presets = [p.strip() for p in args.fast_presets.split(",") if p.strip()]
    counts = {"720p": args.n_1080p, "1080p": args.n_1080p, "12MP": args.n_12mp}
    texts = {
        label: [base64.b64encode(photo_jpeg(*SIZES[label], seed=i)).decode("ascii") for i in range(4)]
        for label in labels
    }
    batches = {label: [texts[label][i % 4] for i in range(counts[label])] for label in labels}
    dims = {label: SIZES[label] for label in labels}

    from preprocess.cost import output_nbytes  # noqa: PLC0415
    from preprocess.processors import read_spec, resolve_processor  # noqa: PLC0415

    results: list[RowResult] = []
    with CpuLoad() as load:
        for n, preset in enumerate(presets):
            print(f"[{preset}] pipeline, plain processes, plain + heap policy: {args.rounds} rounds...", flush=True)
            runs = run_preset(
                preset,
                args.workers,
                batches,
                dims,
                instance=f"bench{os.getpid()}x{n}",
                rounds=args.rounds,
                fast_path=args.fast_path == "on",
            )
            spec = read_spec(resolve_processor(preset))
            for label in labels:
                got = runs[label]
                results.append(
                    RowResult(
                        preset,
                        label,
                        counts[label],
                        args.workers,
                        output_nbytes(spec, *SIZES[label]),
                        pipeline=got["pipeline"],
                        plain=got["plain"],
                        policy=got["policy"],
                    )
                )
                r = results[-1]
                print(
                    f"  {label}: pipeline {r.pipeline_rate:.2f} img/s, plain {r.plain_rate:.2f} img/s "
                    f"(by round: {' '.join(f'{x:.2f}' for x in r.round_ratios)})",
                    flush=True,
                )
        fast_rows: list[FastRow] = []
        if fast_presets and fast_labels:
            print(f"[fast path vs transformers, one CPU] {', '.join(fast_presets)}...", flush=True)
            jpegs = {
                label: [photo_jpeg(*SIZES[label], seed=i % 4) for i in range(args.fast_images)] for label in fast_labels
            }
            pixels = [p.strip() for p in args.fast_pixels.split(",") if p.strip()]
            fast_rows = compare(fast_presets, jpegs, args.fast_rounds, pixels)
    services.check_no_leftovers()
    text, notes = table(results, args.workers)
    if fast_rows:
        fast_text, more = fast_table(fast_rows, args.fast_images, args.fast_rounds)
        text += "\n\nFast path vs transformers, one core:\n\n" + fast_text
        notes += more
    print("\n" + text + "\n\n" + "\n".join(notes))
    png = plot(results, plot_path(args.out, "preprocess_throughput", argv), not args.no_plot)
    jpeg_kib = {label: sum(len(t) * 3 // 4 for t in texts[label]) // len(texts[label]) // 1024 for label in labels}
    settings = [
        "images: "
        + ", ".join(
            f"{label} {SIZES[label][0]}x{SIZES[label][1]} JPEG (~{jpeg_kib[label]} KiB, 4 distinct) x {counts[label]}"
            for label in labels
        ),
        f"presets as shipped (qwen2-vl max_pixels 12845056: no downscale; llava-1.5: CLIP 336); {args.workers} "
        f"workers = plain processes, fast path {args.fast_path} in both; OMP_NUM_THREADS as inherited; one "
        "warm-up task per process first; "
        f"{args.rounds} rounds per variant, interleaved in rotated order; rates from each variant's median round",
    ]
    append_results(
        args.out,
        title="preprocess_throughput",
        command=command_line("preprocess_throughput", argv),
        load=load,
        settings=settings,
        table=text,
        notes=notes,
        plot=png,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
