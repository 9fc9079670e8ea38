"""Handing a request's tensors to a 2-rank engine: the shared-memory arena vs pickling them.

Two spawned processes form a gloo group and run the reference engine's own rank code
(`engine.ranks.Rank`, with a stand-in model that only says "cpu"); this process plays the sidecar
(or an engine's API process) and talks to rank 0 over a `multiprocessing.Pipe`.

- arena: the tensors (`pixel_values` + `image_grid_thw`, Qwen2-VL shapes) are already published in an
  arena extent (a worker wrote them there). Timed from sending rank 0 the descriptors to its ack:
  rank 0 broadcasts the `Copy` command, every rank validates, `ArenaReader.copy_out`s and re-checks,
  the ranks agree with an all-reduce (exactly `engine/ranks.py`), and rank 0 answers.
- pickle: the tensors are in this process's memory (the preprocessing output). Timed from
  `Connection.send` (pickled through the pipe) to the ack: rank 0 unpickles them, then `Broadcast`s
  them to rank 1 over gloo (the reference engine's baseline path, as vLLM/LMDeploy hand off).
- the copy itself: `ArenaReader.copy_out` alone in rank 0 (into a fresh tensor, as the engine does),
  against numpy memcpy of the same bytes into a reused (warm) and a fresh destination.

The HTTP hop that carries the descriptors (or the image) from the sidecar to rank 0 is not included.

    .venv/bin/python -m bench.handoff                 # 1, 23 and 50 MB, 20 repeats
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import common as c

ROW = 1176  # Qwen2-VL pixel_values row: 3 channels x 2 frames x 14 x 14 floats
# pixel_values rows for ~1 MB, 23 MB (1080p at the default max_pixels) and 50.6 MB (1080p at 12.8 MP)
SIZES_MB = {"1": 213, "23": 4888, "50": 10764}
TARGET_SPEEDUP = 10.0
TARGET_COPY_SHARE = 0.5


class _CpuModel:
    """What `Rank` reads of a model for Copy, Broadcast and Drop: the device."""

    def __init__(self) -> None:
        import torch  # noqa: PLC0415

        self.device = torch.device("cpu")


def _rank_main(rank: int, world: int, port: int, conn: Any, shm_dir: str, thp: bool) -> None:  # noqa: PLR0917
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if thp:  # torch's CPU allocator then asks for transparent huge pages (read when torch loads)
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from engine.ranks import Broadcast, Copy, Drop, Rank, Stop  # noqa: PLC0415
    from preprocess.protocol import TensorDescriptor  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = Rank(model=_CpuModel(), shm_dir=shm_dir, world=world, rank=rank)  # type: ignore[arg-type]
    try:
        if rank:
            state.follow()
            return
        conn.send("ready")
        while True:
            message = conn.recv()  # the pickle path's unpickling happens here, inside the timed window
            kind = message[0]
            if kind == "stop":
                state.issue(Stop())
                return
            if kind == "arena":
                _, rid, descs = message
                images = [{name: TensorDescriptor.from_json(d) for name, d in descs.items()}] if descs else []
                state.issue(Copy(rid, images))
                conn.send("ack")
            elif kind == "pickle":
                _, rid, arrays = message
                tensors = [{name: torch.from_numpy(a) for name, a in arrays.items()}]
                layout = [{n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors[0].items()}]
                state.issue(Broadcast(rid, layout), tensors)
                conn.send("ack")
            elif kind == "copy_out":
                _, desc_json, repeats = message
                desc = TensorDescriptor.from_json(desc_json)
                fresh, reused = [], []
                buf = torch.empty(desc.shape, dtype=getattr(torch, desc.dtype))
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    out = state.reader.copy_out(desc)
                    fresh.append(time.perf_counter() - t0)
                    del out
                    # the same bytes into a buffer kept from one request to the next (warm pages)
                    t0 = time.perf_counter()
                    src = state.reader.tensor(desc)
                    buf.copy_(src)
                    del src
                    reused.append(time.perf_counter() - t0)
                conn.send((fresh, reused))
                continue
            state.issue(Drop(rid))  # what Generate does with the staged tensors, outside the timed window
            conn.send("dropped")
    finally:
        state.reader.close()
        dist.destroy_process_group()


@dataclass
class SizeResult:
    label: str
    nbytes: int
    arena_s: list[float]
    pickle_s: list[float]
    copy_s: list[float]
    copy_reused_s: list[float]
    memcpy_warm_s: list[float]
    memcpy_fresh_s: list[float]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def memcpy_times(nbytes: int, repeats: int) -> tuple[list[float], list[float]]:
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the destination's pages in once
    warm, fresh = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new = np.empty_like(src)
        np.copyto(new, src)
        fresh.append(time.perf_counter() - t0)
        del new
    return warm, fresh


def run(
    sizes: Sequence[str], repeats: int, warmup: int, shm_dir: str, thp: bool
) -> tuple[list[SizeResult], list[float]]:
    from preprocess.arena import Arena, pack_tensors, reservation_size, segment_name  # noqa: PLC0415

    ctx = multiprocessing.get_context("spawn")
    port = c.free_port()
    parent, child = ctx.Pipe(duplex=True)
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, port, child if r == 0 else None, shm_dir, thp)) for r in range(2)
    ]
    grid = np.array([[1, 2, 2]], dtype=np.int64)
    largest = max(SIZES_MB[s] for s in sizes) * ROW * 4
    arena = Arena.create(
        segment_name(f"bench{os.getpid()}x0"), reservation_size(largest) * 2 + (1 << 20), directory=shm_dir
    )
    results: list[SizeResult] = []
    fixed_s: list[float] = []
    try:
        for p in procs:
            p.start()
        child.close()
        if not parent.poll(120):
            raise RuntimeError("rank 0 did not start in 120 s")
        assert parent.recv() == "ready"
        rng = np.random.default_rng(1)
        for i in range(warmup + repeats):  # a Copy with no tensors: the protocol's collectives alone
            t0 = time.perf_counter()
            parent.send(("arena", f"e{i}", {}))
            assert parent.recv() == "ack"
            fixed_s.append(time.perf_counter() - t0)
            assert parent.recv() == "dropped"
        for label in sizes:
            pixel_values = rng.standard_normal((SIZES_MB[label], ROW), dtype=np.float32)
            arrays: dict[str, np.ndarray[Any, Any]] = {"pixel_values": pixel_values, "image_grid_thw": grid}
            nbytes = pixel_values.nbytes + grid.nbytes
            arena_s, pickle_s = [], []
            for i in range(warmup + repeats):
                # arena: a worker has written and published the tensors; time descriptors -> ack
                offsets, total = pack_tensors([a.nbytes for a in arrays.values()])
                extent = arena.reserve(total)
                assert extent is not None
                descs = {
                    n: arena.write(extent, off, a).to_json()
                    for (n, a), off in zip(arrays.items(), offsets, strict=True)
                }
                arena.publish(extent, total)
                t0 = time.perf_counter()
                parent.send(("arena", f"a{i}", descs))
                assert parent.recv() == "ack"
                elapsed = time.perf_counter() - t0
                assert parent.recv() == "dropped"
                arena.free(extent)
                if i >= warmup:
                    arena_s.append(elapsed)
                # pickle: the tensors are in this process; time send -> ack
                t0 = time.perf_counter()
                parent.send(("pickle", f"p{i}", arrays))
                assert parent.recv() == "ack"
                elapsed = time.perf_counter() - t0
                assert parent.recv() == "dropped"
                if i >= warmup:
                    pickle_s.append(elapsed)
            # the copy alone, out of a published extent, in rank 0
            extent = arena.reserve(pixel_values.nbytes)
            assert extent is not None
            desc = arena.write(extent, 0, pixel_values)
            arena.publish(extent, pixel_values.nbytes)
            parent.send(("copy_out", desc.to_json(), warmup + repeats))
            copy_s, copy_reused_s = parent.recv()
            arena.free(extent)
            warm, fresh = memcpy_times(pixel_values.nbytes, warmup + repeats)
            results.append(
                SizeResult(
                    f"{nbytes / 1e6:.1f} MB" + (", THP" if thp else ""),
                    nbytes,
                    arena_s,
                    pickle_s,
                    copy_s[warmup:],
                    copy_reused_s[warmup:],
                    warm[warmup:],
                    fresh[warmup:],
                )
            )
            print(
                f"  {label} MB: arena {c.ms(c.percentile(arena_s, 50))}, pickle {c.ms(c.percentile(pickle_s, 50))}",
                flush=True,
            )
        parent.send(("stop",))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        parent.close()
        arena.close()
    return results, fixed_s[warmup:]


def table(results: Sequence[SizeResult], fixed_s: Sequence[float]) -> tuple[str, list[str]]:
    headers = [
        "tensors",
        "arena -> ack p50 (p90)",
        "pickle + broadcast -> ack p50 (p90)",
        "speedup (p50)",
        "copy_out alone p50",
        "copy_out GB/s",
        "copy into reused buffer GB/s",
        "memcpy warm GB/s",
        "memcpy fresh dst GB/s",
        "copy_out / memcpy warm",
    ]
    rows, speed_ok, copy_ok = [], [], []
    for r in results:
        a, p = c.percentile(r.arena_s, 50), c.percentile(r.pickle_s, 50)
        copy_bw = _gbps(r.nbytes, c.percentile(r.copy_s, 50))
        reused_bw = _gbps(r.nbytes, c.percentile(r.copy_reused_s, 50))
        warm_bw = _gbps(r.nbytes, c.percentile(r.memcpy_warm_s, 50))
        fresh_bw = _gbps(r.nbytes, c.percentile(r.memcpy_fresh_s, 50))
        speed_ok.append(p / a >= TARGET_SPEEDUP)
        copy_ok.append(copy_bw >= TARGET_COPY_SHARE * warm_bw)
        rows.append(
            [
                r.label,
                f"{c.ms(a)} ({c.ms(c.percentile(r.arena_s, 90))})",
                f"{c.ms(p)} ({c.ms(c.percentile(r.pickle_s, 90))})",
                f"{p / a:.1f}x",
                c.ms(c.percentile(r.copy_s, 50)),
                f"{copy_bw:.1f}",
                f"{reused_bw:.1f}",
                f"{warm_bw:.1f}",
                f"{fresh_bw:.1f}",
                f"{100 * copy_bw / warm_bw:.0f}%",
            ]
        )
    labels = ", ".join(r.label for r in results)
    notes = [
        f"target: arena handoff >= 10x faster than pickle + broadcast ({labels}): "
        + ", ".join(f"{r.label} {c.verdict(ok)}" for r, ok in zip(results, speed_ok, strict=True)),
        f"target: copy_out >= 50% of memcpy bandwidth (warm destination) ({labels}): "
        + ", ".join(f"{r.label} {c.verdict(ok)}" for r, ok in zip(results, copy_ok, strict=True)),
        f"fixed cost of the arena handoff (a Copy with no tensors: the command's broadcast_object_list, the "
        f"all-reduce and the all_gather_object of checksums, with 2 processes): p50 {c.ms(c.percentile(fixed_s, 50))}",
        "copy_out copies into a freshly allocated tensor, as the engine does (it keeps the tensor); a first write "
        "into fresh pages pays page faults ('memcpy fresh dst' shows it for plain numpy), a buffer reused from one "
        "request to the next does not ('copy into reused buffer': ArenaReader.tensor + Tensor.copy_)",
    ]
    return c.markdown_table(headers, rows), notes


def plot(results: Sequence[SizeResult], path: Path, enabled: bool) -> Path | None:
    def draw(plt: Any) -> None:
        _fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
        x = np.arange(len(results))
        left.bar(x - 0.2, [c.percentile(r.arena_s, 50) * 1000 for r in results], 0.4, label="arena -> ack")
        left.bar(x + 0.2, [c.percentile(r.pickle_s, 50) * 1000 for r in results], 0.4, label="pickle + broadcast")
        left.set_xticks(x, [r.label.replace(", ", "\n") for r in results], fontsize=8)
        left.set_yscale("log")
        left.set_ylabel("ms to ack, 2 ranks (p50, log)")
        left.legend()
        metrics = (
            ("copy_s", "copy_out"),
            ("copy_reused_s", "copy into reused buffer"),
            ("memcpy_warm_s", "memcpy warm"),
            ("memcpy_fresh_s", "memcpy fresh dst"),
        )
        for variant, style in (("", "o-"), (", THP", "s--")):
            group = [r for r in results if r.label.endswith(variant) and (variant or not r.label.endswith("THP"))]
            if not group:
                continue
            for n, (key, label) in enumerate(metrics):
                right.plot(
                    [r.nbytes / 1e6 for r in group],
                    [_gbps(r.nbytes, c.percentile(getattr(r, key), 50)) for r in group],
                    style,
                    color=f"C{n}",
                    label=label + (" (THP)" if variant else ""),
                )
        right.set_xscale("log")
        right.set_xlabel("MB copied")
        right.set_ylabel("GB/s (p50)")
        right.legend(fontsize=7)

    return c.save_plot(path, draw, enabled=enabled)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = c.base_parser(__doc__)
    parser.add_argument("--sizes", default="1,23,50", help="comma list of 1, 23, 50 (MB of pixel_values)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument(
        "--thp",
        choices=("off", "on", "both"),
        default="both",
        help="ranks with THP_MEM_ALLOC_ENABLE=1 (torch allocates huge pages): off, on or both rows",
    )
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES_MB]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {list(SIZES_MB)}")
    with c.CpuLoad() as load:
        results: list[SizeResult] = []
        fixed_s: list[float] = []
        for thp in {"off": [False], "on": [True], "both": [False, True]}[args.thp]:
            print(f"ranks {'with' if thp else 'without'} THP_MEM_ALLOC_ENABLE=1", flush=True)
            got, fixed = run(sizes, args.repeats, args.warmup, args.shm_dir, thp)
            results += got
            fixed_s = fixed_s or fixed
    c.check_no_leftovers()
    text, notes = table(results, fixed_s)
    print("\n" + text + "\n\n" + "\n".join(notes))
    png = plot(results, c.plot_path(args.out, "handoff", argv), not args.no_plot)
    settings = [
        f"{args.repeats} timed repeats per size after {args.warmup} warm-up; 2 ranks (spawned, gloo, 1 torch thread "
        "each) running engine.ranks.Rank; the caller talks to rank 0 over a multiprocessing Pipe",
        "tensors: pixel_values (rows x 1176) float32 + image_grid_thw (1 x 3) int64; rows marked THP: both ranks "
        "run with THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator madvises huge pages; THP mode here: "
        f"{_thp_mode()})",
    ]
    c.append_results(
        args.out,
        title="handoff",
        command=c.command_line("handoff", argv),
        load=load,
        settings=settings,
        table=text,
        notes=notes,
        plot=png,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
