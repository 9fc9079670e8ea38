"""What a benchmark leaves behind: its command line, its RESULTS.md entry (machine, versions, load, table), its plot."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import io
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .common import BENCH_DIR, REPO, GiB
from .cpu import CpuLoad, nproc

# -- the machine -------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "aiohttp", "numpy", "pillow", "uvloop", "matplotlib"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def machine_line() -> str:
    return (
        f"{nproc()} CPUs (nproc), {_mem_total() / GiB:.1f} GiB RAM, {_cpu_model()}, "
        f"Linux {platform.release()}, no GPU used"
    )


# -- command line, RESULTS.md, plots -----------------------------------------------------------------


def base_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(BENCH_DIR), help="where RESULTS.md and the plot go (default bench/)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs and configs")
    return parser


def command_line(module: str, argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    return shlex.join([str(python), "-m", f"bench.{module}", *argv])


def plot_path(out_dir: str | Path, module: str, argv: Sequence[str]) -> Path:
    """`<module>.png`, or `<module>-<hash of the arguments>.png`: a rerun of the same command replaces its plot,
    another command gets its own (where the output goes and whether logs are kept do not count)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out=") and arg not in ("--no-plot", "--keep-logs"):
            args.append(arg)
    tag = hashlib.sha1(shlex.join(args).encode()).hexdigest()[:8] if args else ""
    return Path(out_dir) / (f"{module}-{tag}.png" if tag else f"{module}.png")


def append_results(
    out_dir: str | Path,
    *,
    title: str,
    command: str,
    load: CpuLoad,
    settings: Sequence[str],
    table: str,
    notes: Sequence[str] = (),
    plot: Path | None = None,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "RESULTS.md"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    v = versions()
    text = io.StringIO()
    if not path.exists():
        text.write("# Benchmark results\n\nAppended by `bench/*.py` (newest last). Each entry: date, machine, ")
        text.write("versions, the exact command, whether the machine was busy, the table.\n")
    text.write(f"\n## {title} ({now})\n\n")
    text.write(f"- machine: {machine_line()}\n")
    text.write("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "\n")
    text.write(f"- command: `{command}`\n")
    text.write(f"- load: {load.describe()}\n")
    for line in settings:
        text.write(f"- {line}\n")
    text.write(f"\n{table}\n")
    if notes:
        text.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    if plot is not None:
        rel = os.path.relpath(plot, out)
        text.write(f"\n![{title}]({rel})\n")
    with open(path, "a") as f:
        f.write(text.getvalue())
    return path


def save_plot(path: Path, draw: Callable[[Any], None], *, enabled: bool = True) -> Path | None:
    """Draw with `draw(pyplot)` and save a PNG; None (with a note) when disabled or matplotlib is missing."""
    if not enabled:
        return None
    try:
        import matplotlib  # noqa: PLC0415 - optional: the bench extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("[bench] matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        draw(plt)
        plt.tight_layout()
        plt.savefig(path, dpi=110)
    finally:
        plt.close("all")
    print(f"plot: {path}")
    return path
