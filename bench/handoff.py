"""Handing a request's tensors to a 2-rank engine: the shared-memory arena vs pickling them.

Two spawned processes form a gloo group, linked by a command pipe as `engine.launch` links them, and
run the reference engine's own rank code (`engine.ranks.Rank`, with a stand-in model that only says
"cpu"); this process plays the sidecar (or an engine's API process) and talks to rank 0 over a
`multiprocessing.Pipe`.

- arena: the tensors (`pixel_values` + `image_grid_thw`, Qwen2-VL shapes) are already published in an
  arena extent (a worker wrote them there). Timed from sending rank 0 the descriptors to its ack:
  rank 0 sends the `Copy` command to rank 1, every rank validates, `ArenaReader.copy_out`s and
  re-checks, rank 1 reports to rank 0 and gets the verdict back (exactly `engine/ranks.py`:
  `Rank.issue`, which copies into buffers of the rank's staging pool), and rank 0 answers. After the
  ack (outside the timed window) the caller sends a `Drop`, as the engine's `Generate` consumes the
  tensors, and the buffers go back to the pool: the timed repeats after the warm-up copy into warm
  memory, as a serving engine does.
- pickle: the tensors are in this process's memory (the preprocessing output). Timed from
  `Connection.send` (pickled through the pipe) to the ack: rank 0 unpickles them, then `Broadcast`s
  them to rank 1 over gloo (the reference engine's baseline path, as vLLM/LMDeploy hand off).
- the copy itself, in rank 0: the engine's copy into a staging buffer (`Rank._copy_one`), and for
  reference `ArenaReader.copy_out` into a freshly allocated tensor (the engine before the pool),
  against numpy memcpy of the same bytes into a reused (warm) and a fresh destination.
- the fixed cost: a `Copy` with no tensors end to end, and its parts measured in rank 0 (sending the
  command; the agreement, until rank 1's report is in) and in this process (a round trip on the pipe).

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

from . import services
from .cpu import CpuLoad
from .report import append_results, base_parser, command_line, plot_path, save_plot
from .stats import markdown_table, ms, percentile, verdict

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


def _rank_main(rank: int, world: int, port: int, conn: Any, links: list[Any], shm_dir: str, thp: bool) -> None:  # noqa: PLR0917
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # torch's CPU allocator asks for transparent huge pages or not (read when torch loads); explicit
    # both ways, so that a THP_MEM_ALLOC_ENABLE in the caller's environment does not leak into the "off" rows.
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if thp else "0"
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from engine.ranks import Broadcast, Copy, Drop, Rank, Stop  # noqa: PLC0415
    from preprocess.protocol import TensorDescriptor  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    state = Rank(model=_CpuModel(), shm_dir=shm_dir, world=world, rank=rank, links=links)  # type: ignore[arg-type]
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
                fresh, staged = [], []
                for _ in range(repeats):
                    # what the engine does: copy into a buffer of its staging pool, give it back when done
                    buffers: list[Any] = []
                    t0 = time.perf_counter()
                    out = state._copy_one(desc, buffers, state.model.device)
                    staged.append(time.perf_counter() - t0)
                    del out
                    state.staging.give(buffers)
                    # for reference: into a freshly allocated tensor (what the engine did before the pool)
                    t0 = time.perf_counter()
                    out = state.reader.copy_out(desc)
                    fresh.append(time.perf_counter() - t0)
                    del out
                conn.send((staged, fresh))
                continue
            elif kind == "parts":
                # The fixed cost in pieces, by the same calls `Rank.issue(Copy)` makes: sending the
                # command to rank 1, then the Copy itself (no tensors: the agreement, which waits for
                # rank 1 to receive the command, run it and report).
                _, repeats = message
                send_s, agree_s = [], []
                for _ in range(repeats):
                    command = Copy("parts", [])
                    t0 = time.perf_counter()
                    for link in state.links:
                        link.send(command)
                    t1 = time.perf_counter()
                    state.execute(command)
                    send_s.append(t1 - t0)
                    agree_s.append(time.perf_counter() - t1)
                state.issue(Drop("parts"))
                conn.send((send_s, agree_s))
                continue
            elif kind == "ping":
                conn.send("pong")
                continue
            elif kind == "stats":
                conn.send(state.staging.stats)
                continue
            state.issue(Drop(rid))  # what Generate does with the staged tensors, outside the timed window
            # Rank 1 runs its commands after rank 0 has moved on: wait until it is done with this request
            # (an empty Copy's agreement needs its report), so that the next timed handoff does not also
            # time rank 1 still freeing the previous request's tensors.
            state.issue(Copy("sync", []))
            conn.send("dropped")
    finally:
        state.reader.close()
        dist.destroy_process_group()


@dataclass
class SizeResult:
    label: str
    nbytes: int
    arena_s: list[float]  # interleaved with pickle_s, one of each per repeat
    arena_alone_s: list[float]  # back to back, with no pickle handoff in between
    pickle_s: list[float]
    fixed_p50: float  # this run's empty Copy
    copy_s: list[float]  # the engine's copy, into a staging buffer
    copy_fresh_s: list[float]  # copy_out into a fresh tensor
    memcpy_warm_s: list[float]
    memcpy_fresh_s: list[float]


@dataclass
class Fixed:
    total_s: list[float]  # a Copy with no tensors, send -> ack
    command_s: list[float]  # rank 0: sending the command
    agree_s: list[float]  # rank 0: executing the empty Copy (waiting for rank 1's report, the verdict)
    pipe_s: list[float]  # this process <-> rank 0, a small message each way


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


def run(sizes: Sequence[str], repeats: int, warmup: int, shm_dir: str, thp: bool) -> tuple[list[SizeResult], Fixed]:
    from preprocess.arena import Arena, segment_name  # noqa: PLC0415
    from preprocess.extents import pack_tensors, reservation_size  # noqa: PLC0415

    ctx = multiprocessing.get_context("spawn")
    port = services.free_port()
    parent, child = ctx.Pipe(duplex=True)
    leader, follower = ctx.Pipe(duplex=True)  # the engine's command link, as engine.launch makes it
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, port, child if r == 0 else None, links, shm_dir, thp))
        for r, links in enumerate(([leader], [follower]))
    ]
    grid = np.array([[1, 2, 2]], dtype=np.int64)
    largest = max(SIZES_MB[s] for s in sizes) * ROW * 4
    arena = Arena.create(
        segment_name(f"bench{os.getpid()}x0"), reservation_size(largest) * 2 + (1 << 20), directory=shm_dir
    )
    results: list[SizeResult] = []
    fixed = Fixed([], [], [], [])
    try:
        for p in procs:
            p.start()
        for end in (child, leader, follower):
            end.close()
        if not parent.poll(120):
            raise RuntimeError("rank 0 did not start in 120 s")
        assert parent.recv() == "ready"
        rng = np.random.default_rng(1)
        for i in range(warmup + repeats):  # a Copy with no tensors: the protocol's messages alone
            t0 = time.perf_counter()
            parent.send(("arena", f"e{i}", {}))
            assert parent.recv() == "ack"
            fixed.total_s.append(time.perf_counter() - t0)
            assert parent.recv() == "dropped"
        for _ in range(warmup + repeats):
            t0 = time.perf_counter()
            parent.send(("ping",))
            assert parent.recv() == "pong"
            fixed.pipe_s.append(time.perf_counter() - t0)
        parent.send(("parts", warmup + repeats))
        fixed.command_s, fixed.agree_s = parent.recv()
        for label in sizes:
            pixel_values = rng.standard_normal((SIZES_MB[label], ROW), dtype=np.float32)
            arrays: dict[str, np.ndarray[Any, Any]] = {"pixel_values": pixel_values, "image_grid_thw": grid}
            nbytes = pixel_values.nbytes + grid.nbytes
            arena_s, arena_alone_s, pickle_s = [], [], []

            def arena_handoff(rid: str, arrays: dict[str, np.ndarray[Any, Any]] = arrays) -> float:
                """A worker has written and published the tensors; time descriptors -> ack."""
                offsets, total = pack_tensors([a.nbytes for a in arrays.values()])
                extent = arena.reserve(total)
                assert extent is not None
                descs = {
                    n: arena.write(extent, off, a).to_json()
                    for (n, a), off in zip(arrays.items(), offsets, strict=True)
                }
                arena.publish(extent, total)
                t0 = time.perf_counter()
                parent.send(("arena", rid, descs))
                assert parent.recv() == "ack"
                elapsed = time.perf_counter() - t0
                assert parent.recv() == "dropped"
                arena.free(extent)
                return elapsed

            for i in range(warmup + repeats):
                elapsed = arena_handoff(f"a{i}")
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
            # The same handoffs again, back to back: in the loop above each one follows a pickle handoff,
            # whose tens of MB allocated, written and freed in every process slow the next copy down.
            arena_alone_s = [arena_handoff(f"b{i}") for i in range(warmup + repeats)][warmup:]
            # the copy alone, out of a published extent, in rank 0
            extent = arena.reserve(pixel_values.nbytes)
            assert extent is not None
            desc = arena.write(extent, 0, pixel_values)
            arena.publish(extent, pixel_values.nbytes)
            parent.send(("copy_out", desc.to_json(), warmup + repeats))
            copy_s, copy_fresh_s = parent.recv()
            arena.free(extent)
            warm, fresh = memcpy_times(pixel_values.nbytes, warmup + repeats)
            results.append(
                SizeResult(
                    f"{nbytes / 1e6:.1f} MB" + (", THP" if thp else ""),
                    nbytes,
                    arena_s,
                    arena_alone_s,
                    pickle_s,
                    percentile(fixed.total_s[warmup:], 50),
                    copy_s[warmup:],
                    copy_fresh_s[warmup:],
                    warm[warmup:],
                    fresh[warmup:],
                )
            )
            print(
                f"  {label} MB: arena {ms(percentile(arena_s, 50))}, pickle {ms(percentile(pickle_s, 50))}",
                flush=True,
            )
        parent.send(("stats",))
        stats = parent.recv()
        print(f"  rank 0 staging pool: {stats}", flush=True)
        parent.send(("stop",))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
        parent.close()
        arena.close()
    trim = Fixed(*(getattr(fixed, f)[warmup:] for f in ("total_s", "command_s", "agree_s", "pipe_s")))
    return results, trim


def table(results: Sequence[SizeResult], fixed: Fixed) -> tuple[str, list[str]]:
    headers = [
        "tensors",
        "arena -> ack p50 (p90)",
        "pickle + broadcast -> ack p50 (p90)",
        "speedup (p50)",
        "arena back to back p50 (speedup)",
        "engine copy p50",
        "engine copy GB/s",
        "copy_out fresh tensor GB/s",
        "memcpy warm GB/s",
        "memcpy fresh dst GB/s",
        "engine copy / memcpy warm",
    ]
    rows, speed_ok, alone_ok, copy_ok = [], [], [], []
    for r in results:
        a, p = percentile(r.arena_s, 50), percentile(r.pickle_s, 50)
        alone = percentile(r.arena_alone_s, 50)
        alone_ok.append(p / alone >= TARGET_SPEEDUP)
        copy_bw = _gbps(r.nbytes, percentile(r.copy_s, 50))
        fresh_copy_bw = _gbps(r.nbytes, percentile(r.copy_fresh_s, 50))
        warm_bw = _gbps(r.nbytes, percentile(r.memcpy_warm_s, 50))
        fresh_bw = _gbps(r.nbytes, percentile(r.memcpy_fresh_s, 50))
        speed_ok.append(p / a >= TARGET_SPEEDUP)
        copy_ok.append(copy_bw >= TARGET_COPY_SHARE * warm_bw)
        rows.append(
            [
                r.label,
                f"{ms(a)} ({ms(percentile(r.arena_s, 90))})",
                f"{ms(p)} ({ms(percentile(r.pickle_s, 90))})",
                f"{p / a:.1f}x",
                f"{ms(alone)} ({p / alone:.1f}x)",
                ms(percentile(r.copy_s, 50)),
                f"{copy_bw:.1f}",
                f"{fresh_copy_bw:.1f}",
                f"{warm_bw:.1f}",
                f"{fresh_bw:.1f}",
                f"{100 * copy_bw / warm_bw:.0f}%",
            ]
        )
    labels = ", ".join(r.label for r in results)
    total = percentile(fixed.total_s, 50)
    ceilings = ", ".join(f"{r.label} {percentile(r.pickle_s, 50) / r.fixed_p50:.1f}x" for r in results)
    notes = [
        f"target: arena handoff >= 10x faster than pickle + broadcast ({labels}): "
        + ", ".join(f"{r.label} {verdict(ok)}" for r, ok in zip(results, speed_ok, strict=True))
        + "; arena back to back: "
        + ", ".join(f"{r.label} {verdict(ok)}" for r, ok in zip(results, alone_ok, strict=True)),
        "the arena column alternates with the pickle column, one handoff of each per repeat, so every arena "
        "handoff follows a pickle handoff whose tens of MB allocated, written and freed in every process slow it "
        "down; 'back to back' runs the same arena handoffs again with none in between",
        f"target: the engine's copy >= 50% of memcpy bandwidth (warm destination) ({labels}): "
        + ", ".join(f"{r.label} {verdict(ok)}" for r, ok in zip(results, copy_ok, strict=True)),
        f"fixed cost of the arena handoff (a Copy with no tensors, send -> ack; ranks "
        f"{'with' if results[0].label.endswith('THP') else 'without'} THP_MEM_ALLOC_ENABLE): "
        f"p50 {ms(total)} "
        f"(p90 {ms(percentile(fixed.total_s, 90))}); its parts, p50: sending the command to rank 1 "
        f"{ms(percentile(fixed.command_s, 50))}, then in rank 0 the empty Copy until rank 1 has received "
        f"it, run it and reported, and the verdict is sent {ms(percentile(fixed.agree_s, 50))}; a round "
        f"trip on the caller's pipe {ms(percentile(fixed.pipe_s, 50))}; the rest is Python on both sides "
        "of that pipe (pickling the message, parsing descriptors)",
        f"the fixed cost alone caps the speedup at pickle p50 / fixed p50 (each run's own): {ceilings}",
        "engine copy: ArenaReader.copy_out into a buffer of the rank's staging pool, as engine.ranks.Rank does "
        "(warm pages, reused from one request to the next); copy_out fresh tensor: into a newly allocated tensor, "
        "the engine's path before the pool, which pays a page fault per page written ('memcpy fresh dst' shows the "
        "same for plain numpy)",
    ]
    return markdown_table(headers, rows), notes


def plot(results: Sequence[SizeResult], path: Path, enabled: bool) -> Path | None:
    def draw(plt: Any) -> None:
        _fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
        x = np.arange(len(results))
        left.bar(x - 0.27, [percentile(r.arena_s, 50) * 1000 for r in results], 0.27, label="arena -> ack")
        left.bar(x, [percentile(r.arena_alone_s, 50) * 1000 for r in results], 0.27, label="arena, back to back")
        left.bar(x + 0.27, [percentile(r.pickle_s, 50) * 1000 for r in results], 0.27, label="pickle + broadcast")
        left.set_xticks(x, [r.label.replace(", ", "\n") for r in results], fontsize=8)
        left.set_yscale("log")
        left.set_ylabel("ms to ack, 2 ranks (p50, log)")
        left.legend()
        metrics = (
            ("copy_s", "engine copy (staging buffer)"),
            ("copy_fresh_s", "copy_out fresh tensor"),
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
                    [_gbps(r.nbytes, percentile(getattr(r, key), 50)) for r in group],
                    style,
                    color=f"C{n}",
                    label=label + (" (THP)" if variant else ""),
                )
        right.set_xscale("log")
        right.set_xlabel("MB copied")
        right.set_ylabel("GB/s (p50)")
        right.legend(fontsize=7)

    return save_plot(path, draw, enabled=enabled)


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = base_parser(__doc__)
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
    with CpuLoad() as load:
        results: list[SizeResult] = []
        fixed: Fixed | None = None
        for thp in {"off": [False], "on": [True], "both": [False, True]}[args.thp]:
            print(f"ranks {'with' if thp else 'without'} THP_MEM_ALLOC_ENABLE=1", flush=True)
            got, parts = run(sizes, args.repeats, args.warmup, args.shm_dir, thp)
            results += got
            fixed = fixed or parts  # the first run's: without THP when there are both
    services.check_no_leftovers()
    assert fixed is not None
    text, notes = table(results, fixed)
    print("\n" + text + "\n\n" + "\n".join(notes))
    png = plot(results, plot_path(args.out, "handoff", argv), not args.no_plot)
    settings = [
        f"{args.repeats} timed repeats per size after {args.warmup} warm-up; 2 ranks (spawned, gloo, 1 torch thread "
        "each) running engine.ranks.Rank; the caller talks to rank 0 over a multiprocessing Pipe",
        "tensors: pixel_values (rows x 1176) float32 + image_grid_thw (1 x 3) int64; rows marked THP: both ranks "
        "run with THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator madvises huge pages; THP mode here: "
        f"{_thp_mode()})",
    ]
    append_results(
        args.out,
        title="handoff",
        command=command_line("handoff", argv),
        load=load,
        settings=settings,
        table=text,
        notes=notes,
        plot=png,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
