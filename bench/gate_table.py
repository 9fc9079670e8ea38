"""The headline: LMDeploy PR 4687's table, answered with the reference engine (2 TP ranks) on this machine.

N image requests (one JPEG each, `max_tokens=1`, non-streaming) are sent all at once to

- the engine alone: inline images; rank 0 decodes and preprocesses them itself in its API process and
  broadcasts the tensors to rank 1 (what vLLM and LMDeploy do), no gate;
- the sidecar in passthrough mode (gate = 1, 2, 4, 8): images still inline, at most `gate` requests
  inside the engine until its first body chunk;
- the sidecar in offload mode (gate = 1, 2, 4, 8): the sidecar's workers preprocess into the arena,
  the engine copies the tensors out of shared memory; a slot is held until the engine's ack;
- the same with uint8 pixels (`offload:G+uint8`, `preprocess.transport_dtype: uint8`): the workers write
  the processor's raw uint8 patches, a quarter of the float32 bytes, with the normalisation in the
  descriptor, and every engine rank normalises them itself (bit for bit the processor's float32). The
  arena is sized per slot for the row's dtype, so `offload:4+uint8` holds 4 images in about the arena
  `offload:1` gives one.

Each row gets a fresh engine (and sidecar), so every row starts from the same memory. While the burst
runs, RSS and PSS of every process of the engine's tree plus the sidecar's tree (workers included) are
summed every `--interval-ms`; the peak of the sum is the row's figure. RSS counts pages shared between
processes (the arena, libraries) in each of them, as the PR's "summed process-tree RSS" did; PSS counts
them once.

    .venv/bin/python -m bench.gate_table          # the full table: 96 x 1080p, ~11 GiB peak, ~27 min on 2 cores
    .venv/bin/python -m bench.gate_table --requests 32 --size 1280x720 --rows engine,offload:1

At 96 x 1080p the engine alone holds every request's pixel_values (48 MiB each) on both ranks at its
peak, ~10 GiB above its idle memory, while the sidecar's own processes add a fixed ~0.5 GiB: the
burst must be large against that fixed cost for the ratio to mean what it means at production scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import services
from .client import Outcome, chat_body, post
from .common import GiB, MiB
from .cpu import CpuLoad, Placement, nproc
from .images import data_url, photo_jpeg
from .memory import MemorySample, MemorySampler
from .report import append_results, base_parser, command_line, plot_path, save_plot
from .stats import fine_size, markdown_table, ms, pct_change, percentile, size, verdict

if TYPE_CHECKING:
    from preprocess.processors import ProcessorSpec

ALL_ROWS = (
    "engine,passthrough:1,passthrough:2,passthrough:4,passthrough:8,offload:1,offload:2,offload:4,offload:8,"
    "offload:4+uint8,passthrough:1b,passthrough:2b,offload:1b,offload:2b"
)
PIXEL_DTYPES = ("float32", "uint8")  # preprocess.transport_dtype
TARGET_PSS_SHARE = 0.25
TARGET_THROUGHPUT = 1.0


def uint8_offload_gate(text: str) -> int | None:
    """G of an `offload:G+uint8` row, None for a row without the `+uint8` suffix; ValueError for `+uint8`
    on any other row. The `+uint8` syntax of both gate tables (this one and gate_table_vllm's)."""
    spec, _, suffix = text.strip().partition("+")
    if suffix != "uint8":
        return None
    mode, _, gate = spec.partition(":")
    if mode != "offload" or not gate.isdigit() or int(gate) < 1:
        raise ValueError(f"--rows: +uint8 goes with offload:G, got {text!r}")
    return int(gate)


def pixels_label(pixels: str) -> str:
    """What a row's label adds for its pixel dtype (both gate tables): " uint8", or nothing for float32."""
    return "" if pixels == "float32" else f" {pixels}"


def pixel_bytes(spec: ProcessorSpec, width: int, height: int) -> dict[str, int]:
    """One width x height image's processor outputs (pixel_values and image_grid_thw), in bytes, with
    pixel_values in each transport dtype (`preprocess.cost.output_nbytes`: what the sidecar reserves)."""
    from preprocess.cost import output_nbytes  # noqa: PLC0415

    return {p: output_nbytes(dataclasses.replace(spec, pixel_dtype=p), width, height) for p in PIXEL_DTYPES}


def arena_size(gate: int, per_slot: int) -> int:
    """The arena an offload row gets: `gate` slots of `per_slot` bytes, +1% and 1 MiB of slack."""
    return int(gate * per_slot * 1.01) + MiB


@dataclass(frozen=True, slots=True)
class Row:
    """A variant: `mode:G` gates by count (G requests at once), `mode:Gb` by bytes only (the budget of
    G images, gate.max_concurrent out of the way): the same bound expressed as gate.max_bytes.
    `offload:G+uint8`: the workers send uint8 pixels (preprocess.transport_dtype uint8), the engine
    normalises them; the arena is G slots of a uint8 image's size."""

    mode: str  # engine | passthrough | offload
    gate: int | None
    by_bytes: bool = False
    pixels: str = "float32"  # offload rows: preprocess.transport_dtype

    @property
    def label(self) -> str:
        return ("engine alone" if self.mode == "engine" else f"sidecar {self.mode}") + pixels_label(self.pixels)

    @property
    def gate_label(self) -> str:
        if self.gate is None:
            return "off"
        return f"bytes of {self.gate}" if self.by_bytes else str(self.gate)

    @property
    def short(self) -> str:
        """The plot's name for the row."""
        if self.gate is None:
            return "engine"
        return f"{self.mode[:4]} {self.gate}{'b' if self.by_bytes else ''}" + ("+u8" if self.pixels == "uint8" else "")

    @classmethod
    def parse(cls, text: str) -> Row:
        uint8_gate = uint8_offload_gate(text)
        if uint8_gate is not None:
            return cls("offload", uint8_gate, pixels="uint8")
        mode, _, gate = text.strip().partition(":")
        if mode == "engine" and not gate:
            return cls("engine", None)
        by_bytes = gate.endswith("b")
        count = gate[:-1] if by_bytes else gate
        if mode in ("passthrough", "offload") and count.isdigit() and int(count) >= 1:
            return cls(mode, int(count), by_bytes)
        raise ValueError(f"--rows: expected engine, passthrough:G[b], offload:G[b] or offload:G+uint8, got {text!r}")


@dataclass
class Result:
    row: Row
    outcomes: list[Outcome]
    wall_s: float
    idle_pss: int
    peak_rss: int
    peak_pss: int
    series: list[MemorySample]
    interval_s: float
    estimate_error: int
    other_cpu: float = 0.0  # share of the machine's CPU time used by processes not ours during the row
    pixel_bytes: int = 0  # one image's tensors as the engine gets them (engine/passthrough: float32, made there)
    arena_per_slot: int = 0  # offload rows: the arena's bytes per gate slot, for the row's pixel dtype

    @property
    def arena(self) -> int:
        return arena_size(self.row.gate, self.arena_per_slot) if self.row.gate and self.arena_per_slot else 0

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def sidecar_config(
    row: Row,
    engine_url: str,
    *,
    model: Path,
    requests: int,
    arena: int,
    workers: int,
    timeout_s: float,
    rgb_per_image: int = 0,
) -> dict[str, Any]:
    assert row.gate is not None
    config: dict[str, Any] = {
        "upstream": {"url": engine_url, "mode": row.mode, "ack_timeout_s": timeout_s, "connect_timeout_s": 10},
        "gate": {"max_concurrent": row.gate, "max_queue": requests + 8, "queue_timeout_s": timeout_s},
        "server": {"max_body_memory": "2GiB"},
    }
    if row.by_bytes:
        config["gate"]["max_concurrent"] = requests  # never the bound: bytes are
        if row.mode == "passthrough":
            if rgb_per_image <= 0:
                raise ValueError("a passthrough bytes row needs the image's decoded RGB size")
            config["gate"]["max_bytes"] = row.gate * rgb_per_image  # passthrough prices decoded RGB
    if row.mode == "offload":
        # The engine's own processor (its checkpoint directory), so the tensors are exactly what it expects.
        config["preprocess"] = {
            "processor": str(model),
            "workers": workers,
            "task_timeout_s": 120,
            # uint8: the raw patches; the reference engine takes both (its /health lists them) and
            # normalises uint8 itself with its processor's constants, which the descriptor must match
            "transport_dtype": row.pixels,
        }
        config["gate"]["max_bytes"] = arena  # the arena: `gate` images' exact tensors
    return config


async def burst(url: str, bodies: Sequence[bytes], timeout_s: float) -> tuple[list[Outcome], float]:
    import aiohttp  # noqa: PLC0415

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        outcomes = await asyncio.gather(*(post(session, url + "/v1/chat/completions", b) for b in bodies))
        ended = time.monotonic()
    return list(outcomes), ended - started


def start_row(
    stack: contextlib.ExitStack,
    row: Row,
    *,
    model: Path,
    logs: Path,
    requests: int,
    arena_per_slot: int,
    workers: int,
    timeout_s: float,
    placement: Placement | None = None,
    rgb_per_image: int = 0,
) -> tuple[services.Service, services.Service | None]:
    """A fresh engine, and the row's sidecar in front of it (both starting at once), ready; stopped by `stack`.

    `placement` pins the engine and the sidecar to CPU sets of their own (default: every CPU for all).
    `arena_per_slot`: one image's reservation in the row's pixel dtype (`Row.pixels`)."""
    eng_cpus, side_cpus = (placement.engine, placement.sidecar) if placement else (None, None)
    eng = stack.enter_context(services.engine(model, logs, wait=row.mode == "engine", cpus=eng_cpus))
    if row.mode == "engine":
        return eng, None
    assert row.gate is not None
    arena = arena_size(row.gate, arena_per_slot)
    config = sidecar_config(
        row,
        eng.url,
        model=model,
        requests=requests,
        arena=arena,
        workers=workers,
        timeout_s=timeout_s,
        rgb_per_image=rgb_per_image,
    )
    side = stack.enter_context(services.sidecar(config, logs, cpus=side_cpus))
    services.wait_http(eng, "/health", 180)
    return eng, side


def run_row(
    row: Row,
    *,
    model: Path,
    logs: Path,
    bodies: Sequence[bytes],
    arena_per_slot: int,
    workers: int,
    interval_s: float,
    timeout_s: float,
    rgb_per_image: int,
) -> Result:
    with contextlib.ExitStack() as stack:
        eng, side = start_row(
            stack,
            row,
            model=model,
            logs=logs,
            requests=len(bodies),
            arena_per_slot=arena_per_slot,
            workers=workers,
            timeout_s=timeout_s,
            rgb_per_image=rgb_per_image,
        )
        pids = [eng.pid] if side is None else [eng.pid, side.pid]
        target = eng.url if side is None else side.url
        time.sleep(1.0)  # let start-up settle (lazy imports, the arena's pre-touch) before the baseline
        idle = MemorySampler(pids).sample()
        with MemorySampler(pids, interval_s) as mem:
            outcomes, wall = asyncio.run(burst(target, bodies, timeout_s))
        failed = [o for o in outcomes if o.status != 200]
        if failed:
            print(f"  {len(failed)} failed, e.g. status {failed[0].status} {failed[0].error}", file=sys.stderr)
        return Result(
            row,
            outcomes,
            wall,
            idle.pss,
            mem.peak_rss,
            mem.peak_pss,
            mem.samples,
            mem.mean_interval_s,
            mem.max_estimate_error,
            arena_per_slot=arena_per_slot if row.mode == "offload" else 0,
        )


def table(results: Sequence[Result]) -> str:
    base = next((r for r in results if r.row.mode == "engine"), None)
    headers = [
        "variant",
        "gate",
        "pixel bytes per image",
        "arena (slots x per slot)",
        "throughput req/s",
        "delta vs engine alone",
        "peak RSS (tree)",
        "peak PSS (tree)",
        "RSS reduction",
        "PSS reduction",
        "PSS at idle",
        "success",
        "p50",
        "p99",
        "other CPU",
    ]
    rows = []
    for r in results:
        lat = [o.seconds for o in r.ok]
        rows.append(
            [
                r.row.label,
                r.row.gate_label,
                fine_size(r.pixel_bytes) if r.pixel_bytes else "-",
                f"{fine_size(r.arena)} ({r.row.gate} x {fine_size(r.arena_per_slot)})" if r.arena else "-",
                f"{r.throughput:.3f}",
                pct_change(r.throughput, base.throughput) if base else "-",
                size(r.peak_rss),
                size(r.peak_pss),
                f"{100 * (1 - r.peak_rss / base.peak_rss):.1f}%" if base else "-",
                f"{100 * (1 - r.peak_pss / base.peak_pss):.1f}%" if base else "-",
                size(r.idle_pss),
                f"{len(r.ok)}/{len(r.outcomes)}",
                ms(percentile(lat, 50)),
                ms(percentile(lat, 99)),
                f"{100 * r.other_cpu:.0f}%",
            ]
        )
    return markdown_table(headers, rows)


def targets(results: Sequence[Result]) -> list[str]:
    base = next((r for r in results if r.row.mode == "engine"), None)
    offload = [r for r in results if r.row.mode == "offload"]
    if base is None or not offload:
        return ["target (offload <= 25% of engine-alone PSS at >= 1.0x throughput): not evaluated (needs both rows)"]
    passing = [
        r
        for r in offload
        if r.peak_pss <= TARGET_PSS_SHARE * base.peak_pss and r.throughput >= TARGET_THROUGHPUT * base.throughput
    ]
    best = min(passing or offload, key=lambda r: r.peak_pss)
    share, speed = best.peak_pss / base.peak_pss, best.throughput / base.throughput
    lines = [
        f"target: offload at its best setting peaks <= 25% of engine-alone PSS with throughput >= 1.0x: "
        f"{verdict(bool(passing))} (best: gate={best.row.gate_label}, {100 * share:.0f}% of the PSS at {speed:.2f}x)"
    ]
    fixed = best.idle_pss / base.peak_pss
    lines.append(
        "the offload row's memory at idle (engine ranks + sidecar + its workers + the pre-touched arena) "
        f"is already {100 * fixed:.0f}% of the engine-alone peak: the burst itself adds "
        f"{size(max(0, best.peak_pss - best.idle_pss))} over it, against "
        f"{size(max(0, base.peak_pss - base.idle_pss))} for the engine alone"
    )
    return lines


def uint8_note(results: Sequence[Result], per_image: dict[str, int], shape: Sequence[int]) -> list[str]:
    """What the uint8 rows are, with this run's bytes per image per dtype; nothing without a uint8 row."""
    uint8 = [r for r in results if r.row.pixels == "uint8"]
    if not uint8:
        return []
    f32, u8 = per_image["float32"], per_image["uint8"]
    lines = [
        "'uint8' rows (offload:G+uint8, preprocess.transport_dtype uint8): the sidecar's workers write the "
        "processor's raw uint8 patches (do_rescale=False, do_normalize=False) and the descriptor carries the "
        "normalisation; every engine rank checks it against its own processor's and normalises the patches "
        "itself, bit for bit the processor's float32 (the engine takes both dtypes, no flag); pixel_values "
        f"{list(shape)} + image_grid_thw = {fine_size(u8)} per image as uint8 against {fine_size(f32)} as "
        f"float32 ({u8 / f32:.3f}x), and the arena follows: G slots of the row's dtype"
    ]
    by_gate = {
        r.row.gate: r for r in results if r.row.mode == "offload" and r.row.pixels == "float32" and not r.row.by_bytes
    }
    for r in uint8:
        same = by_gate.get((r.row.gate or 0) // 4) if (r.row.gate or 0) % 4 == 0 else None
        if same is not None:
            lines.append(
                f"at about the arena of offload gate={same.row.gate} ({fine_size(same.arena)}), uint8 runs gate="
                f"{r.row.gate} ({fine_size(r.arena)}): {r.throughput:.3f} vs {same.throughput:.3f} req/s, "
                f"peak PSS {size(r.peak_pss)} vs {size(same.peak_pss)}"
            )
    return lines


def _color(plt: Any, row: Row) -> Any:
    if row.mode == "engine":
        return "0.35"
    shade = 0.45 + 0.12 * min(3, (row.gate or 1).bit_length() - 1)
    palette = "Oranges" if row.mode == "passthrough" else "Greens" if row.pixels == "uint8" else "Blues"
    return plt.get_cmap(palette)(shade)


def plot(results: Sequence[Result], path: Path, enabled: bool) -> Path | None:
    def draw(plt: Any) -> None:
        _fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
        for r in results:
            label = r.row.label + ("" if r.row.gate is None else f" gate={r.row.gate_label}")
            style = "-" if r.row.mode == "offload" else "--" if r.row.mode == "passthrough" else ":"
            left.plot(
                [s.t for s in r.series], [s.pss / GiB for s in r.series], style, label=label, color=_color(plt, r.row)
            )
        left.set_xlabel("seconds since the burst began")
        left.set_ylabel("PSS of engine + sidecar trees (GiB)")
        left.set_title("memory during the burst")
        left.legend(fontsize=7)
        names = [r.row.short for r in results]
        bars = right.bar(names, [r.peak_pss / GiB for r in results], color=[_color(plt, r.row) for r in results])
        for bar, r in zip(bars, results, strict=True):
            right.annotate(
                f"{r.throughput:.2f}/s",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        right.set_ylabel("peak PSS (GiB)")
        right.set_title("peak PSS per variant (label: throughput req/s)")
        right.tick_params(axis="x", labelrotation=45, labelsize=7)

    return save_plot(path, draw, enabled=enabled)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = base_parser(__doc__)
    parser.add_argument("--requests", type=int, default=96, help="concurrent image requests per row (default 96)")
    parser.add_argument("--size", default="1920x1080", help="image size WxH (default 1920x1080)")
    parser.add_argument(
        "--engine",
        choices=("reference", "vllm"),
        default="reference",
        help="the engine behind: the reference engine (2 TP ranks), or real vLLM (`make vllm-env`; "
        "bench/gate_table_vllm.py) (default reference)",
    )
    parser.add_argument(
        "--rows", default=None, help=f"comma list (default {ALL_ROWS}; with --engine vllm: gate_table_vllm's)"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="distinct JPEGs, reused round robin (default 8; vllm: --requests)"
    )
    parser.add_argument(
        "--text-interval-ms", type=float, default=500.0, help="vllm: a text request every this often (default 500)"
    )
    parser.add_argument("--workers", type=int, default=nproc(), help="offload preprocessing workers (default nproc)")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="memory sampling interval (default 50)")
    parser.add_argument("--row-timeout-s", type=float, default=900.0, help="longest burst per row (default 900)")
    parser.add_argument(
        "--model", default=None, help="engine checkpoint (default: the tiny Qwen2-VL, built if missing)"
    )
    parser.add_argument(
        "--max-memory-share",
        type=float,
        default=0.7,
        help="refuse to run when the predicted engine-alone peak exceeds this share of MemAvailable",
    )
    args = parser.parse_args(argv)
    if args.engine == "vllm":
        from . import gate_table_vllm  # noqa: PLC0415

        return gate_table_vllm.main(args, argv)
    rows = [Row.parse(t) for t in (args.rows or ALL_ROWS).split(",") if t.strip()]
    args.images = args.images or 8
    width, height = parse_size(args.size)

    from preprocess.cost import output_shapes  # noqa: PLC0415
    from preprocess.extents import reservation_size  # noqa: PLC0415
    from preprocess.processors import read_spec, resolve_processor  # noqa: PLC0415

    model = services.ensure_model(args.model)
    spec = read_spec(resolve_processor(str(model)))
    per_pixels = pixel_bytes(spec, width, height)
    per_image = per_pixels["float32"]
    slots = {p: reservation_size(n) for p, n in per_pixels.items()}
    shapes = output_shapes(spec, width, height)
    predicted = args.requests * per_image * 2 + 2 * GiB  # rank 0 + rank 1 copies, plus the processes
    available = _mem_available()
    print(
        f"{args.requests} x {width}x{height}: pixel_values {shapes['pixel_values'][0]} = {size(per_image)} per "
        f"image; engine-alone peak predicted ~{size(predicted)} (MemAvailable {size(available)})"
    )
    if any(r.mode == "engine" for r in rows) and predicted > args.max_memory_share * available:
        print(
            f"refusing: the predicted peak is above {args.max_memory_share:.0%} of MemAvailable; use fewer "
            "--requests or a smaller --size",
            file=sys.stderr,
        )
        return 2
    jpegs = [photo_jpeg(width, height, seed=i) for i in range(args.images)]
    bodies = [chat_body(image_url=data_url(jpegs[i % len(jpegs)])) for i in range(args.requests)]

    results: list[Result] = []
    with services.log_directory(args.keep_logs) as logs, CpuLoad() as load:
        for row in rows:
            print(f"[{row.label} gate={row.gate_label}] {args.requests} requests...", flush=True)
            with CpuLoad() as row_load:
                result = run_row(
                    row,
                    model=model,
                    logs=logs,
                    bodies=bodies,
                    arena_per_slot=slots[row.pixels],
                    workers=args.workers,
                    interval_s=args.interval_ms / 1000,
                    timeout_s=args.row_timeout_s,
                    rgb_per_image=width * height * 3,
                )
            result.other_cpu = row_load.foreign_share
            result.pixel_bytes = per_pixels[row.pixels]
            print(
                f"  {result.throughput:.3f} req/s, peak PSS {size(result.peak_pss)}, RSS {size(result.peak_rss)}, "
                f"{len(result.ok)}/{len(result.outcomes)} ok",
                flush=True,
            )
            results.append(result)
    services.check_no_leftovers()

    text = table(results)
    notes = targets(results) + uint8_note(results, per_pixels, shapes["pixel_values"][0])
    print("\n" + text + "\n\n" + "\n".join(notes))
    png = plot(results, plot_path(args.out, "gate_table", argv), not args.no_plot)
    mean_interval = sum(r.interval_s for r in results) / len(results)
    settings = [
        f"workload: {args.requests} concurrent requests per row, each one {width}x{height} JPEG "
        f"(~{sum(map(len, jpegs)) // len(jpegs) // 1024} KiB, {args.images} distinct, base64 data URL) + a short "
        "text, max_tokens=1, non-streaming; a fresh engine (and sidecar) per row",
        f"processor: the model's preprocessor_config.json (= qwen2-vl preset, max_pixels {spec.max_pixels}, so no "
        f"downscale): pixel_values {list(shapes['pixel_values'][0])} float32 = {fine_size(per_image)} per image "
        f"({fine_size(per_pixels['uint8'])} as uint8), image_grid_thw included",
        "engine: reference engine, 2 TP ranks (gloo, CPU), tiny random-weight Qwen2-VL; children run with "
        "OMP_NUM_THREADS=1",
        f"sidecar: passthrough gate.max_bytes default (priced as decoded RGB); offload {args.workers} workers, "
        f"arena = gate x {fine_size(slots['float32'])} (float32) or {fine_size(slots['uint8'])} ('uint8' rows: "
        "preprocess.transport_dtype uint8, the engine normalises) (+1%, +1 MiB); max_queue = N+8, no 429s by design; "
        f"'bytes of G' rows: gate.max_concurrent = N and the bound is gate.max_bytes = G images' bytes "
        f"(passthrough: G x {size(width * height * 3)} of decoded RGB; offload: the arena, as above)",
        f"memory: RSS and PSS summed over every process of the engine tree + the sidecar tree, sampled every "
        f"{args.interval_ms:.0f} ms (achieved {mean_interval * 1000:.0f} ms on average): RSS from the kernel's "
        "counters (/proc/<pid>/status), PSS from them with each process's sharing discount read from smaps_rollup "
        "every 0.25 s or less often (at most ~10% of a core) and the arena counted once (bench/memory.py); largest "
        f"gap seen between that PSS and an exact reading: {size(max(r.estimate_error for r in results))}",
    ]
    append_results(
        args.out,
        title="gate_table",
        command=command_line("gate_table", argv),
        load=load,
        settings=settings,
        table=text,
        notes=notes,
        plot=png,
    )
    return 0 if all(len(r.ok) == len(r.outcomes) for r in results) else 1


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
