"""The benchmarks work: each one runs at its smallest scale, as `python -m bench.<name>`, into a temporary
directory, and must exit 0, write its table to RESULTS.md, save its plot (where matplotlib is installed:
`make bench` installs it, `make test` does not), and leave no process or shared-memory segment behind
(the benchmarks check their own children; the segment names carry the benchmark's pid)."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import loop_trace
from bench.gate_table import ALL_ROWS, Row, pixel_bytes, sidecar_config
from bench.gate_table_vllm import VllmRow
from preprocess.cost import output_nbytes
from preprocess.processors import read_spec, resolve_processor

REPO = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def run_bench(name: str, out: Path, *args: str, timeout_s: float = 60) -> str:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"bench.{name}", "--out", str(out), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGINT first: the benchmark's `finally` blocks stop the engines and sidecars it started
        # (each in a session of its own, which a kill of the benchmark alone would leave running).
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"bench.{name} ran past {timeout_s} s:\n{output.decode(errors='replace')[-4000:]}")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}:\n{text[-4000:]}"
    assert not glob.glob(f"/dev/shm/mm-sidecar-bench{proc.pid}x*"), "a shared-memory segment was left behind"
    results = (out / "RESULTS.md").read_text()
    assert f"## {name} (" in results
    assert "- command: `" in results and f"-m bench.{name}" in results
    assert "\n|---|" in results, "no markdown table in RESULTS.md"
    if HAS_MATPLOTLIB:
        plots = list(out.glob(f"{name}*.png"))
        assert plots and plots[0].stat().st_size > 0, f"no plot in {out}"
    print(f"bench.{name}: {time.monotonic() - started:.1f} s")
    return text


def table_row(text: str, start: str) -> list[str]:
    """The cells of the markdown row that starts with `start` (e.g. "| sidecar offload | 1 |")."""
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_bytes(text: str) -> float:
    """A `bench.gate_table.fine_size` figure ("466 KiB", "1.8 MiB", "2.00 GiB") in bytes."""
    match = re.fullmatch(r"([0-9.]+) (KiB|MiB|GiB)", text.strip())
    assert match, text
    return float(match[1]) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[match[2]]


def test_gate_table(tmp_path: Path) -> None:
    # one engine-alone row, a float32 and a uint8 offload row, a passthrough bytes row: every code path,
    # four engine start-ups
    text = run_bench(
        "gate_table",
        tmp_path,
        "--requests",
        "2",
        "--size",
        "320x240",
        "--images",
        "1",
        "--rows",
        "engine,offload:1,passthrough:1b,offload:1+uint8",
        "--workers",
        "1",
        timeout_s=180,
    )
    assert "| sidecar passthrough | bytes of 1 |" in text
    assert "| engine alone | off |" in text and "| sidecar offload | 1 |" in text
    headers = table_row(text, "| variant |")
    success, per_image, arena = (
        headers.index(h) for h in ("success", "pixel bytes per image", "arena (slots x per slot)")
    )
    rows = {name: table_row(text, f"| {name} | 1 |") for name in ("sidecar offload", "sidecar offload uint8")}
    every = [table_row(text, start) for start in ("| engine alone | off |", "| sidecar passthrough | bytes of 1 |")]
    assert all(row[success] == "2/2" for row in [*every, *rows.values()]), (every, rows)
    # a uint8 slot is a quarter of a float32 one (plus image_grid_thw and page rounding), and the table says so
    per_slot = {name: re.fullmatch(r"\S+ \S+ \(1 x (.+)\)", row[arena]) for name, row in rows.items()}
    assert all(per_slot.values()), rows
    f32, u8 = (parse_bytes(m[1]) for m in per_slot.values() if m)
    assert 0.22 < u8 / f32 < 0.28, (u8, f32)
    f32_image, u8_image = (parse_bytes(row[per_image]) for row in rows.values())
    assert 0.22 < u8_image / f32_image < 0.28, rows
    assert "'uint8' rows (offload:G+uint8, preprocess.transport_dtype uint8)" in text


def test_gate_table_on_vllm(tmp_path: Path) -> None:
    # One offload row into a real vLLM (vllm-engine, TP=1, its own, fresh): the headline table's code
    # path, and offload into vLLM at TP=1 end to end (tests/test_vllm_offload.py runs TP=2). The
    # passthrough rows run the same code with a plain vLLM, which tests/test_vllm.py covers.
    text = run_bench(
        "gate_table",
        tmp_path,
        "--engine",
        "vllm",
        "--requests",
        "2",
        "--size",
        "320x240",
        "--rows",
        "offload:1",
        "--text-interval-ms",
        "100",
        timeout_s=300,
    )
    assert "| sidecar offload | 1 |" in text and "2/2" in text
    assert "## gate_table (vLLM) (" in (tmp_path / "RESULTS.md").read_text()


def test_vllm_gate_rows_parse() -> None:
    assert VllmRow.parse("engine") == VllmRow(None)
    assert VllmRow.parse("engine+cache") == VllmRow(None, cache=True)
    assert VllmRow.parse("passthrough:2b") == VllmRow(2, by_bytes=True)
    assert VllmRow.parse("passthrough:1+cache") == VllmRow(1, cache=True)
    assert VllmRow.parse("offload:4") == VllmRow(4, offload=True) and VllmRow.parse("offload:4").mode == "offload"
    with pytest.raises(ValueError, match="offload:G"):
        VllmRow.parse("offload:1+cache")
    assert VllmRow.parse("offload:2+uint8") == VllmRow(2, offload=True, pixels="uint8")
    with pytest.raises(ValueError, match=r"\+uint8 goes with offload:G"):
        VllmRow.parse("passthrough:1+uint8")
    with pytest.raises(ValueError, match="only \\+cache"):
        VllmRow.parse("engine+fast")


def test_gate_rows_by_bytes_bound_bytes_only() -> None:
    assert Row.parse("offload:2b") == Row("offload", 2, by_bytes=True)
    assert Row.parse("passthrough:4") == Row("passthrough", 4)
    with pytest.raises(ValueError, match="passthrough:G"):
        Row.parse("passthrough:0b")
    common: dict[str, Any] = {"model": Path("/m"), "requests": 96, "arena": 10 << 20, "workers": 2, "timeout_s": 60.0}
    by_bytes = sidecar_config(Row.parse("passthrough:2b"), "http://e", rgb_per_image=6_220_800, **common)
    assert by_bytes["gate"]["max_concurrent"] == 96 and by_bytes["gate"]["max_bytes"] == 2 * 6_220_800
    by_count = sidecar_config(Row.parse("passthrough:2"), "http://e", rgb_per_image=6_220_800, **common)
    assert by_count["gate"]["max_concurrent"] == 2 and "max_bytes" not in by_count["gate"]
    offload = sidecar_config(Row.parse("offload:2b"), "http://e", **common)
    assert offload["gate"] == {"max_concurrent": 96, "max_queue": 104, "queue_timeout_s": 60.0, "max_bytes": 10 << 20}
    assert offload["preprocess"]["transport_dtype"] == "float32"


def test_gate_rows_uint8_offload() -> None:
    # the +uint8 suffix of gate_table_vllm's rows: offload:G only, uint8 pixels to the engine
    assert Row.parse("offload:4+uint8") == Row("offload", 4, pixels="uint8")
    assert Row.parse("offload:4+uint8").label == "sidecar offload uint8" == VllmRow.parse("offload:4+uint8").label
    for text in ("passthrough:1+uint8", "engine+uint8", "offload:1b+uint8", "offload:0+uint8"):
        with pytest.raises(ValueError, match=r"\+uint8 goes with offload:G"):
            Row.parse(text)
    with pytest.raises(ValueError, match=r"offload:G\+uint8"):
        Row.parse("offload:1+cache")
    config = sidecar_config(
        Row.parse("offload:4+uint8"),
        "http://e",
        model=Path("/m"),
        requests=8,
        arena=10 << 20,
        workers=2,
        timeout_s=60.0,
    )
    assert config["preprocess"]["transport_dtype"] == "uint8" and config["gate"]["max_concurrent"] == 4
    # the arena follows the dtype: 4 uint8 slots take about the bytes of 1 float32 one
    spec = read_spec(resolve_processor("qwen2-vl"))
    per_image = pixel_bytes(spec, 1920, 1080)
    assert per_image["float32"] == output_nbytes(spec, 1920, 1080)
    assert 0.24 < per_image["uint8"] / per_image["float32"] < 0.26
    assert "offload:4+uint8" in ALL_ROWS.split(",")


def test_text_isolation(tmp_path: Path) -> None:
    text = run_bench(
        "text_isolation",
        tmp_path,
        "--rows",
        "passthrough:1,offload:1",
        "--placements",
        "split",
        "--images",
        "2",
        "--size",
        "320x240",
        "--text",
        "2",
        "--text-interval-ms",
        "50",
        timeout_s=180,
    )
    assert "| sidecar passthrough | 1 | split |" in text and "| sidecar offload | 1 | split |" in text
    assert "event-loop lag p99" in text
    assert "split = sidecar on CPU 0, engine and client on CPU 1" in (tmp_path / "RESULTS.md").read_text()
    # the CPU-wait column (the 14th) holds a share of real samples on Linux, never the "no samples" marker
    offload = next(line for line in text.splitlines() if line.startswith("| sidecar offload | 1 | split |"))
    assert offload.split(" | ")[13].endswith("%"), offload


def test_handoff(tmp_path: Path) -> None:
    text = run_bench("handoff", tmp_path, "--sizes", "1", "--repeats", "2", "--warmup", "1", "--thp", "off")
    assert "arena handoff >= 10x" in text and "| 1.0 MB |" in text


def test_preprocess_throughput(tmp_path: Path) -> None:
    text = run_bench(
        "preprocess_throughput",
        tmp_path,
        "--presets",
        "llava-1.5",
        "--sizes",
        "1080p",
        "--images-1080p",
        "2",
        "--workers",
        "1",
        "--fast-presets",
        "llava-1.5",
        "--fast-sizes",
        "720p",
        "--fast-images",
        "1",
        "--fast-rounds",
        "1",
        "--fast-pixels",
        "float32,bfloat16,uint8",
    )
    assert "| llava-1.5 | 1080p | 2 |" in text
    assert "| llava-1.5 | 720p 1280x720 | float32 | 597x336, crop 336x336 | 1.3 MiB |" in text
    assert "| llava-1.5 | 720p 1280x720 | bfloat16 | 597x336, crop 336x336 | 662 KiB |" in text  # half
    assert "| llava-1.5 | 720p | uint8 | - | - | - | - | - | not covered: transformers |" in text  # Qwen only


def test_proxy_overhead(tmp_path: Path) -> None:
    loops = "asyncio,uvloop" if HAS_UVLOOP else "asyncio"
    text = run_bench(
        "proxy_overhead",
        tmp_path,
        "--requests",
        "20",
        "--rounds",
        "1",
        "--warmup",
        "2",
        "--concurrency",
        "1,4",
        "--loops",
        loops,
    )
    assert "added p50 <= 0.5 ms at c=1" in text


def test_hostile_mix(tmp_path: Path) -> None:
    # every kind at 1/100 of its size, in the mix and the text-alone baseline: both paths, two sidecars
    text = run_bench(
        "hostile_mix",
        tmp_path,
        "--variants",
        "alone,mix",
        "--seconds",
        "1.5",
        "--scale",
        "0.01",
        "--slowloris",
        "2",
        "--trickle-ms",
        "50",
        "--trace-loop",
        timeout_s=120,
    )
    assert "| alone |" in text and "| mix |" in text and "loop lag p99" in text
    traced = text.split("Slow loop turns", 1)[1].split("How the hostile requests", 1)[0]
    assert re.search(r"^\| alone \| \d+ \|", traced, re.M) and re.search(r"^\| mix \| \d+ \|", traced, re.M), traced
    mix = next(line for line in text.splitlines() if line.startswith("| mix |"))
    assert mix.split(" | ")[1].split("/")[0] != "0", mix  # text requests were answered during the mix
    for kind in ("a: ", "b: ", "c: ", "d: ", "e: slowloris"):
        assert f"| mix | {kind}" in text, kind  # each hostile kind was sent and its answers counted
    answered = [line for line in text.splitlines() if line.startswith("| mix | ") and " MiB | " in line]
    assert len(answered) == 7 and not [line for line in answered if line.endswith("| none |")], answered
    assert "target: loop lag p99 <= 5 ms with the hostile mix" in text


_TRACED = """
import asyncio, sys, time
from pathlib import Path
from bench.loop_trace import install

install(Path(sys.argv[1]))

def busy() -> None:
    end = time.thread_time() + 0.02
    while time.thread_time() < end:
        pass

async def main() -> None:
    loop = asyncio.get_running_loop()
    print(time.monotonic(), flush=True)
    loop.call_soon(busy)
    loop.call_soon(time.sleep, 0.02)
    await asyncio.sleep(0.05)
    print(time.monotonic(), flush=True)

asyncio.run(main())
"""


def test_the_loop_tracer_tells_code_on_the_cpu_from_a_thread_off_it(tmp_path: Path) -> None:
    # bench/loop_trace.py, as `hostile_mix --trace-loop` uses it: a callback that computes for 20 ms
    # is "on CPU", one that sleeps 20 ms "off CPU" (as a loop waiting for the GIL or a page is).
    out = tmp_path / "trace.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", _TRACED, str(out)], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    start, end = (float(x) for x in done.stdout.split())
    summary = loop_trace.summarize(out, start, end)
    assert summary["groups"].keys() == {"on CPU", "off CPU"}, summary
    assert summary["groups"]["on CPU"][0] == 1 and summary["groups"]["off CPU"][0] == 1
    assert 19 <= summary["groups"]["on CPU"][1] < 200 and 19 <= summary["groups"]["off CPU"][1] < 200
    assert [what for what, _ in summary["on_cpu_top"]] == ["<function busy>"]
    assert loop_trace.summarize(out, end + 1, end + 2)["turns"] == 0  # outside the window: not counted
