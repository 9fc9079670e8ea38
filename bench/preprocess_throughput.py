"""Images/s through the sidecar's preprocessing stage vs the bare processor in as many plain processes.

- pipeline: `preprocess.pipeline.ImagePipeline` with `--workers` worker processes (default: the
  number of cores) and an arena; each task is what offload mode sends (the image's base64 text, an
  extent, the cost model's shapes): base64 decode, image decode, the HF processor, outputs written
  into the extent, descriptors back; the extent is freed at once (as if the engine acked at once).
  Up to 2 tasks per worker are in flight, so a worker never waits for the next task.
- plain: the same number of spawned processes, each with the same processor loaded, each given its
  share of the same base64 texts up front, doing base64 decode + `decode` + `run_processor` and nothing
  else (outputs dropped). The clock starts when every process is loaded and told to go.

    .venv/bin/python -m bench.preprocess_throughput
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import common as c

TARGET_RATIO = 0.9
SIZES = {"1080p": (1920, 1080), "12MP": (4032, 3024)}


@dataclass
class RowResult:
    preset: str
    size: str
    images: int
    pipeline_s: float
    plain_s: float
    trim_s: float  # plain processes that also malloc_trim(0) after each image, as the workers do
    out_bytes: int
    pipeline_busy: float  # share of workers x wall spent in decode + processor + arena write
    plain_busy: float

    @property
    def pipeline_rate(self) -> float:
        return self.images / self.pipeline_s

    @property
    def plain_rate(self) -> float:
        return self.images / self.plain_s

    @property
    def trim_rate(self) -> float:
        return self.images / self.trim_s


def _plain_main(preset: str, conn: Any, trim: bool) -> None:
    import binascii  # noqa: PLC0415
    import ctypes  # noqa: PLC0415

    from preprocess.processors import decode, load_processor, run_processor  # noqa: PLC0415

    malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim if trim else None
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
        for text in texts:
            started = time.perf_counter()
            outputs = run_processor(processor, decode(binascii.a2b_base64(text.encode("ascii"), strict_mode=True)))
            busy += time.perf_counter() - started
            del outputs
            if malloc_trim is not None:
                malloc_trim(0)
        conn.send(("done", busy))


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

    def run(self, texts: Sequence[str]) -> tuple[float, float]:
        """(wall seconds, seconds the processes spent decoding and processing, summed)."""
        shares = [list(texts[i :: len(self.conns)]) for i in range(len(self.conns))]
        for conn, share in zip(self.conns, shares, strict=True):
            conn.send(share)
        for conn in self.conns:
            assert conn.recv() == "loaded"
        started = time.perf_counter()
        for conn in self.conns:
            conn.send("go")
        busy = 0.0
        for conn in self.conns:
            if not conn.poll(600):
                raise RuntimeError("a plain process took more than 600 s")
            kind, seconds = conn.recv()
            assert kind == "done"
            busy += seconds
        return time.perf_counter() - started, busy

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


async def run_pipeline(
    preset: str, workers: int, batches: dict[str, list[str]], dims: dict[str, tuple[int, int]], instance: str
) -> dict[str, tuple[float, float]]:
    """(wall, busy) seconds per batch label through one ImagePipeline (processor loaded once for all batches).

    busy: what the workers report they spent decoding (base64 included), processing and writing.
    """
    from preprocess.arena import reservation_size  # noqa: PLC0415
    from preprocess.cost import output_nbytes, output_shapes  # noqa: PLC0415
    from preprocess.pipeline import ImagePipeline  # noqa: PLC0415
    from preprocess.processors import read_spec, resolve_processor  # noqa: PLC0415

    spec = read_spec(resolve_processor(preset))
    in_flight = 2 * workers
    shapes = {label: output_shapes(spec, *dims[label]) for label in batches}
    # what the sidecar reserves per image (sidecar/classify.py)
    need = {label: reservation_size(output_nbytes(spec, *dims[label])) for label in batches}
    size = in_flight * max(need.values()) + 4 * c.MiB
    pipeline = ImagePipeline(
        processor=preset, workers=workers, task_timeout_s=300, instance=instance, directory="/dev/shm", size=size
    )
    out: dict[str, tuple[float, float]] = {}
    await pipeline.start()
    try:
        for label, texts in batches.items():
            slots = asyncio.Semaphore(in_flight)

            async def one(text: str, label: str = label, slots: asyncio.Semaphore = slots) -> float:
                async with slots:
                    hold = pipeline.reserve(need[label])
                    assert hold is not None, "the arena is sized for every task in flight"
                    try:
                        done = await pipeline.process(hold, text, shapes[label])
                    finally:
                        hold.release()
                    return done.result.decode_s + done.result.preprocess_s + done.result.write_s

            # warm-up: one task per worker (the first call in a process pays for lazy imports)
            await asyncio.gather(*(one(texts[0]) for _ in range(workers)))
            started = time.perf_counter()
            busy = await asyncio.gather(*(one(t) for t in texts))
            out[label] = (time.perf_counter() - started, sum(busy))
    finally:
        await pipeline.close()
    return out


def run_plain(
    preset: str, workers: int, batches: dict[str, list[str]], *, trim: bool
) -> dict[str, tuple[float, float]]:
    plain = Plain(preset, workers, trim=trim)
    try:
        out = {}
        for label, texts in batches.items():
            plain.run([texts[0]] * workers)  # warm-up, as for the pipeline
            out[label] = plain.run(texts)
        return out
    finally:
        plain.close()


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
        "plain + malloc_trim img/s",
        "workers busy",
        "plain busy",
    ]
    rows = []
    for r in results:
        ratio = r.pipeline_rate / r.plain_rate
        rows.append(
            [
                r.preset,
                r.size,
                r.images,
                c.size(r.out_bytes),
                f"{r.pipeline_rate:.2f}",
                f"{r.plain_rate:.2f}",
                f"{ratio:.2f}x",
                c.verdict(ratio >= TARGET_RATIO),
                f"{r.trim_rate:.2f} ({r.trim_rate / r.plain_rate:.2f}x)",
                f"{100 * r.pipeline_busy:.0f}%",
                f"{100 * r.plain_busy:.0f}%",
            ]
        )
    met = all(r.pipeline_rate / r.plain_rate >= TARGET_RATIO for r in results)
    notes = [
        f"target: pipeline >= 0.9x the plain processes on every row: {c.verdict(met)}",
        "busy = time the processes spent decoding (base64 included), running the processor and (workers) writing "
        "the arena, over processes x wall time; the rest of a worker's time is the task's trip (the parent "
        "dispatches a worker's next task when its previous result arrives, and pickles the base64 text to it), "
        "and the malloc_trim(0) each worker runs after each image ('plain + malloc_trim' prices that alone)",
    ]
    return c.markdown_table(headers, rows), notes


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

    return c.save_plot(path, draw, enabled=enabled)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = c.base_parser(__doc__)
    parser.add_argument(
        "--presets", default="qwen2-vl,llava-1.5", help="processor presets (default qwen2-vl,llava-1.5)"
    )
    parser.add_argument("--sizes", default="1080p,12MP", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--images-1080p", type=int, default=32, dest="n_1080p")
    parser.add_argument("--images-12mp", type=int, default=8, dest="n_12mp")
    parser.add_argument("--workers", type=int, default=c.nproc(), help="workers and plain processes (default nproc)")
    args = parser.parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    labels = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := set(labels) - set(SIZES):
        parser.error(f"--sizes: unknown {sorted(unknown)}")
    counts = {"1080p": args.n_1080p, "12MP": args.n_12mp}
    texts = {
        label: [base64.b64encode(c.photo_jpeg(*SIZES[label], seed=i)).decode("ascii") for i in range(4)]
        for label in labels
    }
    batches = {label: [texts[label][i % 4] for i in range(counts[label])] for label in labels}
    dims = {label: SIZES[label] for label in labels}

    from preprocess.cost import output_nbytes  # noqa: PLC0415
    from preprocess.processors import read_spec, resolve_processor  # noqa: PLC0415

    results: list[RowResult] = []
    with c.CpuLoad() as load:
        for n, preset in enumerate(presets):
            print(f"[{preset}] pipeline...", flush=True)
            piped = asyncio.run(run_pipeline(preset, args.workers, batches, dims, f"bench{os.getpid()}x{n}"))
            print(f"[{preset}] plain processes...", flush=True)
            plain = run_plain(preset, args.workers, batches, trim=False)
            print(f"[{preset}] plain processes with malloc_trim...", flush=True)
            trimmed = run_plain(preset, args.workers, batches, trim=True)
            spec = read_spec(resolve_processor(preset))
            for label in labels:
                (p_wall, p_busy), (q_wall, q_busy) = piped[label], plain[label]
                results.append(
                    RowResult(
                        preset,
                        label,
                        counts[label],
                        pipeline_s=p_wall,
                        plain_s=q_wall,
                        trim_s=trimmed[label][0],
                        out_bytes=output_nbytes(spec, *SIZES[label]),
                        pipeline_busy=p_busy / (p_wall * args.workers),
                        plain_busy=q_busy / (q_wall * args.workers),
                    )
                )
                print(
                    f"  {label}: pipeline {results[-1].pipeline_rate:.2f} img/s, plain "
                    f"{results[-1].plain_rate:.2f} img/s",
                    flush=True,
                )
    c.check_no_leftovers()
    text, notes = table(results, args.workers)
    print("\n" + text + "\n\n" + "\n".join(notes))
    png = plot(results, c.plot_path(args.out, "preprocess_throughput", argv), not args.no_plot)
    jpeg_kib = {label: sum(len(t) * 3 // 4 for t in texts[label]) // len(texts[label]) // 1024 for label in labels}
    settings = [
        "images: "
        + ", ".join(
            f"{label} {SIZES[label][0]}x{SIZES[label][1]} JPEG (~{jpeg_kib[label]} KiB, 4 distinct) x {counts[label]}"
            for label in labels
        ),
        f"presets as shipped (qwen2-vl max_pixels 12845056: no downscale; llava-1.5: CLIP 336); {args.workers} "
        "workers = plain processes; OMP_NUM_THREADS as inherited; one warm-up task per worker first",
    ]
    c.append_results(
        args.out,
        title="preprocess_throughput",
        command=c.command_line("preprocess_throughput", argv),
        load=load,
        settings=settings,
        table=text,
        notes=notes,
        plot=png,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
