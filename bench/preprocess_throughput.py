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
pipeline / plain round by round.

    .venv/bin/python -m bench.preprocess_throughput
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preprocess.worker import HEAP_SLACK, STAGE_MAX, HeapKeeper

from . import services
from .common import MiB
from .cpu import CpuLoad, nproc
from .images import photo_jpeg
from .report import append_results, base_parser, command_line, plot_path, save_plot
from .stats import markdown_table, size, verdict

TARGET_RATIO = 0.9
SIZES = {"1080p": (1920, 1080), "12MP": (4032, 3024)}


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


def _plain_main(preset: str, conn: Any, trim: bool) -> None:
    import binascii  # noqa: PLC0415

    from preprocess.processors import decode, load_processor, run_processor  # noqa: PLC0415

    heap = HeapKeeper() if trim else None
    processor = load_processor(preset)
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
            outputs = run_processor(processor, decode(binascii.a2b_base64(text.encode("ascii"), strict_mode=True)))
            busy += time.perf_counter() - started
            del outputs
            if heap is not None:
                trims += heap.after_image()
        conn.send(("done", busy, trims))


class Plain:
    """`workers` plain processes with `preset` loaded."""

    def __init__(self, preset: str, workers: int, *, trim: bool = False) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_plain_main, args=(preset, child, trim), daemon=True)
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
        processor=preset, workers=workers, task_timeout_s=300, instance=instance, directory="/dev/shm", size=arena_size
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
                    return r.decode_s + r.preprocess_s + r.write_s, r.heap_trimmed, staged

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
) -> dict[str, dict[str, list[Round]]]:
    with contextlib.ExitStack() as stack:
        plains: dict[str, Plain] = {}
        for name, trim in (("plain", False), ("policy", True)):
            plains[name] = Plain(preset, workers, trim=trim)
            stack.callback(plains[name].close)
        return asyncio.run(
            _interleaved(preset, workers, batches, dims, instance=instance, rounds=rounds, plains=plains)
        )


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
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    labels = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := set(labels) - set(SIZES):
        parser.error(f"--sizes: unknown {sorted(unknown)}")
    counts = {"1080p": args.n_1080p, "12MP": args.n_12mp}
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
                preset, args.workers, batches, dims, instance=f"bench{os.getpid()}x{n}", rounds=args.rounds
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
    services.check_no_leftovers()
    text, notes = table(results, args.workers)
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
        "workers = plain processes; OMP_NUM_THREADS as inherited; one warm-up task per process first; "
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
