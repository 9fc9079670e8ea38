"""Is text traffic stalled by an image storm? Engine alone vs through the sidecar.

For each variant (a fresh engine, and a sidecar in front of it for the sidecar rows):
1. quiet: `--text` text requests one after the other: latency p50/p99;
2. storm: `--images` image requests sent all at once (as in gate_table); meanwhile a text request is
   started every `--text-interval-ms` (open loop, each one timed on its own) until the storm is over,
   and the event loop of the process the client talks to is probed every `--probe-interval-ms` with a
   cheap GET: the sidecar's `/healthz`, or the engine's `/v1/models` for the engine alone.

The sidecar's own `mm_sidecar_event_loop_lag_seconds` (how late its loop runs a timer due every 10 ms) is
read from `/metrics` just before and just after the storm; the difference of the two histograms is
the lag during the storm, and the share of samples above 5 ms decides the target (p99 <= 5 ms).
`mm_sidecar_event_loop_cpu_wait_seconds` is read the same way: over windows of about 100 ms, how long
the loop's thread was runnable but not running. Lag that comes with as much CPU wait is the kernel
running other processes, not the loop being blocked.
The `/healthz` round trip is kept as an outside view (an upper bound: loopback HTTP costs ~0.3 ms).

Each variant runs in each `--placements`: `shared` (every process on every CPU: the sidecar's loop
competes with its workers, both engine ranks and the client) and `split` (the sidecar and its workers
on CPU 0, the engine and the client on the others: a pod whose containers got exclusive cores).

    .venv/bin/python -m bench.text_isolation
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import services
from .client import Outcome, chat_body, post
from .cpu import CpuLoad, Placement, nproc
from .gate_table import Row, parse_size, pixel_bytes, start_row
from .images import data_url, photo_jpeg
from .report import append_results, base_parser, command_line, plot_path, save_plot
from .stats import markdown_table, ms, percentile, verdict

TARGET_LAG_P99_S = 0.005


@dataclass
class Result:
    row: Row
    quiet: list[Outcome]
    storm_text: list[Outcome]
    images: list[Outcome]
    storm_s: float
    probes: list[float]  # seconds, successful probes during the storm
    probes_quiet: list[float]
    probe_path: str
    lag: dict[float, float]  # sidecar rows: le -> samples of mm_sidecar_event_loop_lag_seconds in the storm
    cpu_wait: dict[float, float]  # the same for mm_sidecar_event_loop_cpu_wait_seconds
    scrape_s: list[float]  # how long each GET /metrics took
    placement: str

    @staticmethod
    def ok(outcomes: Sequence[Outcome]) -> list[float]:
        return [o.seconds for o in outcomes if o.status == 200]


async def _probe(session: Any, url: str, interval_s: float, stop: asyncio.Event, into: list[float]) -> None:
    import aiohttp  # noqa: PLC0415

    while not stop.is_set():
        started = time.monotonic()
        try:
            async with session.get(url) as resp:
                await resp.read()
                if resp.status == 200:
                    into.append(time.monotonic() - started)
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


LAG_METRIC = "mm_sidecar_event_loop_lag_seconds"
CPU_WAIT_METRIC = "mm_sidecar_event_loop_cpu_wait_seconds"


def histogram_buckets(text: str, metric: str) -> dict[float, float]:
    """le -> cumulative count of one histogram, from a Prometheus text page (summed over its other labels)."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "_bucket{"):
            labels, _, value = line.rpartition(" ")
            le = float(labels.split('le="', 1)[1].split('"', 1)[0])
            out[le] = out.get(le, 0.0) + float(value)
    return out


def lag_share_above(lag: dict[float, float], seconds: float) -> float:
    total = lag.get(float("inf"), 0.0)
    return 1 - lag.get(seconds, 0.0) / total if total else float("nan")


def lag_quantile_bound(lag: dict[float, float], q: float) -> float:
    """The smallest bucket bound holding a share q of the samples (the quantile is at most this)."""
    total = lag.get(float("inf"), 0.0)
    for le in sorted(lag):
        if total and lag[le] >= q * total:
            return le
    return float("nan")


async def _scrape(session: Any, url: str, into: list[float]) -> dict[str, dict[float, float]]:
    started = time.monotonic()
    async with session.get(url) as resp:
        text = await resp.text()
    into.append(time.monotonic() - started)
    return {m: histogram_buckets(text, m) for m in (LAG_METRIC, CPU_WAIT_METRIC)}


async def _run(
    target: str,
    probe_url: str,
    metrics_url: str | None,
    *,
    text_body: bytes,
    image_bodies: Sequence[bytes],
    quiet_n: int,
    text_interval_s: float,
    probe_interval_s: float,
    timeout_s: float,
) -> tuple[
    list[Outcome],
    list[Outcome],
    list[Outcome],
    float,
    list[float],
    list[float],
    dict[str, dict[float, float]],
    list[float],
]:
    import aiohttp  # noqa: PLC0415

    chat = target + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        # quiet: one text request after the other (after a few unmeasured ones), and the probe on its own
        for _ in range(3):
            await post(session, chat, text_body)
        quiet = [await post(session, chat, text_body) for _ in range(quiet_n)]
        probes_quiet: list[float] = []
        stop = asyncio.Event()
        prober = asyncio.create_task(_probe(session, probe_url, probe_interval_s, stop, probes_quiet))
        await asyncio.sleep(min(2.0, 50 * probe_interval_s))
        stop.set()
        await prober
        # storm: all images at once; text requests on a fixed clock; probes; the lag histogram around it
        scrapes: list[float] = []
        before: dict[str, dict[float, float]] = {}
        if metrics_url:
            before = await _scrape(session, metrics_url, scrapes)
            await asyncio.sleep(0.3)  # the scrape's own lag is observed before the storm, not in it
        stop = asyncio.Event()
        probes: list[float] = []
        prober = asyncio.create_task(_probe(session, probe_url, probe_interval_s, stop, probes))
        texts: list[asyncio.Task[Outcome]] = []
        started = time.monotonic()
        storm = asyncio.gather(*(post(session, chat, b) for b in image_bodies))
        max_texts = int(timeout_s / text_interval_s) + 1
        while not storm.done() and len(texts) < max_texts:
            texts.append(asyncio.create_task(post(session, chat, text_body)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(storm), text_interval_s)
        images = await storm
        storm_s = time.monotonic() - started
        stop.set()
        await prober
        storm_text = list(await asyncio.gather(*texts))
        during: dict[str, dict[float, float]] = {}
        if metrics_url:
            after = await _scrape(session, metrics_url, scrapes)
            during = {
                m: {le: count - before[m].get(le, 0.0) for le, count in buckets.items()} for m, buckets in after.items()
            }
    return quiet, storm_text, list(images), storm_s, probes, probes_quiet, during, scrapes


def run_row(
    row: Row,
    *,
    model: Path,
    logs: Path,
    args: Any,
    image_bodies: Sequence[bytes],
    text_body: bytes,
    arena_per_slot: int,
    placement: str,
) -> Result:
    pinned = Placement.split() if placement == "split" else None
    with contextlib.ExitStack() as stack:
        eng, side = start_row(
            stack,
            row,
            model=model,
            logs=logs,
            requests=len(image_bodies),
            arena_per_slot=arena_per_slot,
            workers=args.workers,
            timeout_s=args.timeout_s,
            placement=pinned,
        )
        if pinned is not None:  # the client shares the engine's CPUs, never the sidecar's
            everything = os.sched_getaffinity(0)
            os.sched_setaffinity(0, pinned.engine)
            stack.callback(os.sched_setaffinity, 0, everything)
        target, probe_path = (eng.url, "/v1/models") if side is None else (side.url, "/healthz")
        got = asyncio.run(
            _run(
                target,
                target + probe_path,
                None if side is None else target + "/metrics",
                text_body=text_body,
                image_bodies=image_bodies,
                quiet_n=args.text,
                text_interval_s=args.text_interval_ms / 1000,
                probe_interval_s=args.probe_interval_ms / 1000,
                timeout_s=args.timeout_s,
            )
        )
    quiet, storm_text, images, storm_s, probes, probes_quiet, during, scrapes = got
    lag, cpu_wait = during.get(LAG_METRIC, {}), during.get(CPU_WAIT_METRIC, {})
    return Result(
        row, quiet, storm_text, images, storm_s, probes, probes_quiet, probe_path, lag, cpu_wait, scrapes, placement
    )


def _share(buckets: dict[float, float]) -> str:
    if not buckets.get(float("inf")):
        return "n/a"
    return f"{100 * lag_share_above(buckets, TARGET_LAG_P99_S):.1f}%"


def _bound(le: float) -> str:
    return "> 10 s" if le == float("inf") else f"<= {ms(le)}"  # the top bucket bound


def table(results: Sequence[Result]) -> tuple[str, list[str]]:
    headers = [
        "variant",
        "gate",
        "placement",
        "text alone p50",
        "text alone p99",
        "text in storm p50",
        "text in storm p99",
        "text ok",
        "images ok",
        "storm",
        "loop lag samples > 5 ms",
        "loop lag p99 (bucket)",
        "loop lag max (bucket)",
        "loop CPU wait samples > 5 ms",
        "probe",
        "probe p50 quiet",
        "probe p50 storm",
        "probe p99 storm",
    ]
    rows, notes = [], []
    for r in results:
        quiet, storm = Result.ok(r.quiet), Result.ok(r.storm_text)
        sidecar = r.row.mode != "engine"
        share = lag_share_above(r.lag, TARGET_LAG_P99_S) if sidecar else float("nan")
        top = lag_quantile_bound(r.lag, 1.0)  # the bucket holding the largest sample
        rows.append(
            [
                r.row.label,
                "off" if r.row.gate is None else r.row.gate,
                r.placement,
                ms(percentile(quiet, 50)),
                ms(percentile(quiet, 99)),
                ms(percentile(storm, 50)),
                ms(percentile(storm, 99)),
                f"{len(storm)}/{len(r.storm_text)}",
                f"{len(Result.ok(r.images))}/{len(r.images)}",
                f"{r.storm_s:.1f} s",
                f"{100 * share:.1f}% of {r.lag.get(float('inf'), 0):.0f}" if sidecar else "-",
                _bound(lag_quantile_bound(r.lag, 0.99)) if sidecar else "-",
                _bound(top) if sidecar else "-",
                _share(r.cpu_wait) if sidecar else "-",
                r.probe_path,
                ms(percentile(r.probes_quiet, 50)),
                ms(percentile(r.probes, 50)),
                ms(percentile(r.probes, 99)),
            ]
        )
        if sidecar:
            notes.append(
                f"target: sidecar event-loop lag p99 <= 5 ms during the storm ({r.row.mode} gate={r.row.gate}, "
                f"{r.placement} CPUs, "
                f"mm_sidecar_event_loop_lag_seconds, {r.lag.get(float('inf'), 0):.0f} samples): "
                f"{verdict(share <= 0.01)} ({100 * share:.1f}% of the samples above 5 ms; /healthz round trip "
                f"p99 {ms(percentile(r.probes, 99))})"
            )
            notes.append(
                f"{r.row.mode} gate={r.row.gate}, {r.placement}: a GET /metrics took "
                + " and ".join(ms(t) for t in r.scrape_s)
            )
    notes.append(
        "loop CPU wait: share of the ~100 ms windows in which the loop's thread waited more than 5 ms for a CPU "
        "(Linux schedstat); when it matches the lag share, the lag is CPU contention, not a blocked loop"
    )
    notes.append(
        "text requests run on the engine's single model thread after whatever image work is queued there; the gate "
        "bounds that queue to `gate` image requests, the engine alone queues the whole storm ahead of them"
    )
    return markdown_table(headers, rows), notes


def plot(results: Sequence[Result], path: Path, enabled: bool) -> Path | None:
    def draw(plt: Any) -> None:
        _fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in results:
            label = r.row.label + ("" if r.row.gate is None else f" gate={r.row.gate}") + f" ({r.placement})"
            ok = [o for o in r.storm_text if o.status == 200]
            t0 = min((o.started for o in r.storm_text), default=0.0)
            left.plot([o.started - t0 for o in ok], [o.seconds * 1000 for o in ok], ".-", label=label)
            right.hist([p * 1000 for p in r.probes], bins=50, histtype="step", label=label)
        left.set_yscale("log")
        left.set_xlabel("text request sent at (s into the storm)")
        left.set_ylabel("text latency (ms, log)")
        left.set_title("text requests during the image storm")
        left.legend(fontsize=8)
        right.set_xlabel("probe round trip (ms)")
        right.set_yscale("log")
        right.set_title("event-loop probe during the storm")
        right.legend(fontsize=8)

    return save_plot(path, draw, enabled=enabled)


def _with_workers(args: Any, placement: str) -> Any:
    """Workers = the CPUs the sidecar runs on, unless --workers says otherwise."""
    if args.workers is not None:
        return args
    cpus = len(Placement.split().sidecar) if placement == "split" else nproc()
    return argparse.Namespace(**{**vars(args), "workers": cpus})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = base_parser(__doc__)
    parser.add_argument("--rows", default="engine,passthrough:2,offload:2", help="variants, as in gate_table")
    parser.add_argument("--images", type=int, default=32, help="image requests in the storm (default 32)")
    parser.add_argument("--size", default="1920x1080", help="image size WxH (default 1920x1080)")
    parser.add_argument("--text", type=int, default=20, help="text requests when quiet (default 20)")
    parser.add_argument("--text-interval-ms", type=float, default=200.0, help="text requests in the storm")
    parser.add_argument("--probe-interval-ms", type=float, default=20.0, help="event-loop probes (default 20)")
    parser.add_argument("--workers", type=int, default=None, help="offload workers (default: the sidecar's CPUs)")
    parser.add_argument(
        "--placements", default="shared,split", help="CPU placements to run each row in: shared, split (default both)"
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="longest storm (default 600)")
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    rows = [Row.parse(t) for t in args.rows.split(",") if t.strip()]
    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    if not placements or any(p not in ("shared", "split") for p in placements):
        parser.error(f"--placements: shared and/or split, got {args.placements!r}")
    width, height = parse_size(args.size)

    from preprocess.extents import reservation_size  # noqa: PLC0415
    from preprocess.processors import read_spec, resolve_processor  # noqa: PLC0415

    model = services.ensure_model(args.model)
    # one image's reservation in each transport dtype: an `offload:G+uint8` row's slots are uint8's
    per_image = pixel_bytes(read_spec(resolve_processor(str(model))), width, height)
    jpegs = [photo_jpeg(width, height, seed=i) for i in range(min(8, args.images))]
    image_bodies = [chat_body(image_url=data_url(jpegs[i % len(jpegs)])) for i in range(args.images)]
    text_body = chat_body(text="Say hello.")
    results = []
    with services.log_directory(args.keep_logs) as logs, CpuLoad() as load:
        for placement in placements:
            for row in rows:
                print(f"[{row.label} gate={row.gate or 'off'}, {placement} CPUs]", flush=True)
                results.append(
                    run_row(
                        row,
                        model=model,
                        logs=logs,
                        args=_with_workers(args, placement),
                        image_bodies=image_bodies,
                        text_body=text_body,
                        arena_per_slot=reservation_size(per_image[row.pixels]),
                        placement=placement,
                    )
                )
    services.check_no_leftovers()
    text, notes = table(results)
    print("\n" + text + "\n\n" + "\n".join(notes))
    png = plot(results, plot_path(args.out, "text_isolation", argv), not args.no_plot)
    settings = [
        f"storm: {args.images} concurrent {width}x{height} JPEG requests (max_tokens=1); text: 'Say hello.', "
        f"max_tokens=1, non-streaming, {args.text} one after the other when quiet, one every "
        f"{args.text_interval_ms:.0f} ms during the storm; /healthz (or the engine's /v1/models) probed every "
        f"{args.probe_interval_ms:.0f} ms; the sidecar's loop-lag histogram read before and after the storm",
        "engine: reference engine, 2 TP ranks, tiny Qwen2-VL, fresh per variant; offload workers = "
        + ", ".join(f"{_with_workers(args, p).workers} ({p})" for p in placements)
        + "; children run with OMP_NUM_THREADS=1; workers run at the default preprocess.worker_nice (10, SCHED_BATCH)",
        "placements: shared = every process on every CPU; split = "
        + (Placement.split().describe() if "split" in placements else "not run"),
    ]
    append_results(
        args.out,
        title="text_isolation",
        command=command_line("text_isolation", argv),
        load=load,
        settings=settings,
        table=text,
        notes=notes,
        plot=png,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
