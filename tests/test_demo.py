"""`mm-sidecar demo` against a real sidecar, and the process-tree memory it reports."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from preprocess.procmem import tree, tree_memory
from sidecar.demo import run_demo
from sidecar.echo import EchoEngine

from .conftest import StackFactory


def test_tree_memory_counts_children() -> None:
    alone = tree_memory()
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and tree_memory().rss_bytes < alone.rss_bytes + (48 << 20):
            time.sleep(0.05)
        with_child = tree_memory()
        assert child.pid in tree(os.getpid())
        assert with_child.processes == alone.processes + 1
        assert with_child.rss_bytes >= alone.rss_bytes + (48 << 20)
        assert 0 < with_child.pss_bytes <= with_child.rss_bytes
    finally:
        child.kill()
        child.wait()


async def test_demo_runs_a_mixed_burst_and_prints_the_table(
    stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    s = await stack(EchoEngine(prefill_s=0.01), gate={"max_concurrent": 1})
    url = str(s.client.make_url("")).rstrip("/")
    assert await run_demo(url, None, 9, "echo") == 0
    out = capsys.readouterr()
    assert "9 requests in" in out.out
    assert "| image | False | 3 | 3 |" in out.out and "| text | False | 2 | 2 |" in out.out
    assert "peak memory" in out.out
    assert "9/9" in out.err  # the progress bar reached the end
    assert s.engine.stats.requests == 9


async def test_demo_counts_each_refusal_status(stack: StackFactory, capsys: pytest.CaptureFixture[str]) -> None:
    # A gate of one and no queue: most image requests of the burst get 429, and the table says how many.
    s = await stack(EchoEngine(prefill_s=0.2), gate={"max_concurrent": 1, "max_queue": 0})
    url = str(s.client.make_url("")).rstrip("/")
    await run_demo(url, None, 12, "echo")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| image |")]
    refused = 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        requests, ok, others = int(cells[2]), int(cells[3]), cells[4]
        if ok < requests:
            assert others == f"429 x{requests - ok}", row
            refused += requests - ok
        else:
            assert others == "-", row
    assert refused > 0, rows
