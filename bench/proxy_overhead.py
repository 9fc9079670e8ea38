"""What the sidecar adds to a text request: rate and latency through it (passthrough) vs straight to the engine.

The engine is the built-in echo upstream (`mm-sidecar echo-upstream --tokens 1`, its own process), so
what is measured is the proxy, not a model. `bench/bare_proxy.py` (read the body, post it upstream,
answer its bytes: nothing else) runs as a reference: the floor two loopback hops through an aiohttp
proxy cost on this machine, apart from what the sidecar adds on top of it. Two sidecars run side by
side in front of it, unchanged: one on asyncio's default event loop (as shipped) and one on uvloop's
(`bench/uvloop_serve.py`). The
client (this process, aiohttp on asyncio in every row) sends non-streaming chat requests with a short
text, keep-alive, at concurrency 1 (one after the other) and 32 (32 closed-loop senders). The three
targets are measured in alternating rounds so that drift on a shared machine hits them alike; all
processes share the machine's cores.

    .venv/bin/python -m bench.proxy_overhead
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
from .client import chat_body, post
from .cpu import CpuLoad
from .report import append_results, base_parser, command_line, plot_path, save_plot
from .stats import markdown_table, ms, pct_change, percentile, verdict

TARGET_ADDED_P50_S = 0.0005


@dataclass
class Series:
    target: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0


async def measure(
    url: str, body: bytes, *, concurrency: int, requests: int, warmup: int, cap_s: float, into: Series
) -> None:
    import aiohttp  # noqa: PLC0415

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(warmup):
            await post(session, url, body)
        per_sender = max(1, requests // concurrency)
        deadline = time.monotonic() + cap_s
        latencies: list[float] = []
        errors = 0

        async def sender() -> None:
            nonlocal errors
            for _ in range(per_sender):
                if time.monotonic() > deadline:
                    return
                outcome = await post(session, url, body)
                if outcome.status == 200:
                    latencies.append(outcome.seconds)
                else:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        into.wall_s += time.monotonic() - started
        into.latencies += latencies
        into.errors += errors


def table(series: Sequence[Series]) -> tuple[str, list[str]]:
    headers = ["concurrency", "target", "requests", "req/s", "p50", "p99", "added p50", "added p99", "errors"]
    rows, notes = [], []
    for conc in sorted({s.concurrency for s in series}):
        group = [s for s in series if s.concurrency == conc]
        direct = next(s for s in group if s.target == "direct")
        d50, d99 = percentile(direct.latencies, 50), percentile(direct.latencies, 99)
        for s in group:
            p50, p99 = percentile(s.latencies, 50), percentile(s.latencies, 99)
            added = s.target != "direct"
            rows.append(
                [
                    conc,
                    s.target,
                    len(s.latencies),
                    f"{s.rate:.0f}",
                    ms(p50),
                    ms(p99),
                    ms(p50 - d50) if added else "-",
                    ms(p99 - d99) if added else "-",
                    s.errors,
                ]
            )
            if s.target.startswith("sidecar") and conc == 1:
                notes.append(
                    f"target: added p50 <= 0.5 ms at c=1 through the sidecar on {s.target.removeprefix('sidecar ')}: "
                    f"{verdict(p50 - d50 <= TARGET_ADDED_P50_S)} ({(p50 - d50) * 1000:.2f} ms)"
                )
    by = {(s.target, s.concurrency): s for s in series}
    for conc in sorted({s.concurrency for s in series}):
        bare = by.get(("bare aiohttp proxy", conc))
        for name in ("sidecar asyncio", "sidecar uvloop"):
            side = by.get((name, conc))
            if bare and side and conc == 1:
                ours = percentile(side.latencies, 50) - percentile(bare.latencies, 50)
                notes.append(
                    f"c=1: {name} p50 is {ours * 1000:.2f} ms above the bare aiohttp proxy's: the sidecar's own work "
                    "(parse, classify, header filtering, metrics); the rest of its added latency is the second hop"
                )
    for conc in sorted({s.concurrency for s in series}):
        a, u = by.get(("sidecar asyncio", conc)), by.get(("sidecar uvloop", conc))
        if a and u:
            winner = "uvloop" if u.rate > a.rate else "asyncio"
            notes.append(
                f"c={conc}: uvloop {u.rate:.0f} req/s vs asyncio {a.rate:.0f} req/s "
                f"({pct_change(u.rate, a.rate)}), p50 {ms(percentile(u.latencies, 50))} vs "
                f"{ms(percentile(a.latencies, 50))}: {winner} is faster here"
            )
    return markdown_table(headers, rows), notes


def plot(series: Sequence[Series], path: Path, enabled: bool) -> Path | None:
    def draw(plt: Any) -> None:
        concs = sorted({s.concurrency for s in series})
        _fig, axes = plt.subplots(1, len(concs), figsize=(5.5 * len(concs), 4.2), squeeze=False)
        for ax, conc in zip(axes[0], concs, strict=True):
            for s in (s for s in series if s.concurrency == conc):
                ordered = sorted(s.latencies)
                if ordered:
                    ys = [i / len(ordered) for i in range(len(ordered))]
                    ax.plot([v * 1000 for v in ordered], ys, label=f"{s.target} ({s.rate:.0f}/s)")
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms, log)")
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"text requests, concurrency {conc}")
            ax.legend(fontsize=8)

    return save_plot(path, draw, enabled=enabled)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = base_parser(__doc__)
    parser.add_argument("--requests", type=int, default=3000, help="requests per target, concurrency and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--concurrency", default="1,32", help="comma list (default 1,32)")
    parser.add_argument("--loops", default="asyncio,uvloop", help="sidecar event loops (default asyncio,uvloop)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--cap-s", type=float, default=120.0, help="longest measurement (default 120 s)")
    args = parser.parse_args(argv)
    concs = [int(x) for x in args.concurrency.split(",") if x.strip()]
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    if unknown := set(loops) - {"asyncio", "uvloop"}:
        parser.error(f"--loops: unknown {sorted(unknown)}")
    body = chat_body(text="Say hello.")
    series: dict[tuple[str, int], Series] = {}
    with services.log_directory(args.keep_logs) as logs, CpuLoad() as load, contextlib.ExitStack() as stack:
        echo = stack.enter_context(services.echo_upstream(logs))
        bare = stack.enter_context(services.bare_proxy(echo.url, logs))
        targets = {"direct": echo.url, "bare aiohttp proxy": bare.url}
        for loop in loops:
            config = {"upstream": {"url": echo.url, "mode": "passthrough"}}
            side = stack.enter_context(services.sidecar(config, logs, uvloop=loop == "uvloop"))
            targets[f"sidecar {loop}"] = side.url
        for rnd in range(args.rounds):
            for conc in concs:
                for name, url in targets.items():
                    s = series.setdefault((name, conc), Series(name, conc))
                    asyncio.run(
                        measure(
                            url + "/v1/chat/completions",
                            body,
                            concurrency=conc,
                            requests=args.requests,
                            warmup=args.warmup,
                            cap_s=args.cap_s,
                            into=s,
                        )
                    )
                    print(f"  round {rnd + 1} c={conc} {name}: {s.rate:.0f} req/s so far", flush=True)
    services.check_no_leftovers()
    text, notes = table(list(series.values()))
    print("\n" + text + "\n\n" + "\n".join(notes))
    png = plot(list(series.values()), plot_path(args.out, "proxy_overhead", argv), not args.no_plot)
    settings = [
        f"{args.rounds} alternating rounds x {args.requests} requests per target and concurrency (+{args.warmup} "
        "warm-up each); text chat request, non-streaming, max_tokens=1; keep-alive connections",
        "engine: `mm-sidecar echo-upstream --tokens 1` (no model); sidecars: passthrough, default gate (text is never "
        "gated), one on asyncio and one on uvloop; client: aiohttp on asyncio; everything on loopback",
    ]
    append_results(
        args.out,
        title="proxy_overhead",
        command=command_line("proxy_overhead", argv),
        load=load,
        settings=settings,
        table=text,
        notes=notes,
        plot=png,
    )
    return 0 if all(s.errors == 0 for s in series.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
