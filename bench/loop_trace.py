"""`python -m bench.loop_trace OUT ARGS`: `mm-sidecar ARGS`, unchanged, with its slow event-loop turns recorded.

A diagnostic for loop lag (`bench/hostile_mix.py --trace-loop`): the lag histogram says how late the
loop ran, not why. This wraps asyncio's callback runner and its selector. For each callback that ran
over `SLOW_S`, and each `select` that returned more than `SLOW_S` after its timeout, it records the
wall time, what ran (a task's step: its coroutine and where the step ended), and:
- for a callback, the loop thread's CPU time in it: close to the wall time, code held the loop; far
  below, the thread was off the CPU in the middle (preempted, a page fault's I/O, the GIL);
- for a late `select`, the thread's run-queue wait in it (/proc/thread-self/schedstat): a wake-up
  delayed by other tasks on the CPU, else by the GIL another thread held or by the hypervisor.
Written to OUT at exit as JSON lines; `at` is time.monotonic(), comparable across processes.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import re
import selectors
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

SLOW_S = 0.002


def _run_delay_ns() -> int:
    with open("/proc/thread-self/schedstat", "rb") as f:
        return int(f.read().split()[1])


def _where(coro: Any) -> str:
    """The chain of awaits a coroutine is suspended in: where its step ended."""
    frames = []
    while coro is not None and len(frames) < 16:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(frames)


def _describe(callback: Any) -> str:
    task = getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        return f"task {getattr(coro, '__qualname__', '?')} stepped to {_where(coro)}"
    return re.sub(r" at 0x[0-9a-f]+|fd=\d+", "", repr(callback))[:200]


def install(out: Path) -> None:
    """Trace the loop of the thread that runs asyncio callbacks from now on; write `out` at exit."""
    records: list[dict[str, Any]] = []
    run = asyncio.events.Handle._run

    def traced_run(self: asyncio.events.Handle) -> None:
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            run(self)
        finally:
            wall = time.monotonic() - t0
            if wall > SLOW_S:
                cpu = time.thread_time() - c0
                what = _describe(getattr(self, "_callback", None))
                records.append({"kind": "callback", "at": t0, "ms": wall * 1e3, "cpu_ms": cpu * 1e3, "what": what})

    select = selectors.EpollSelector.select

    def traced_select(self: selectors.EpollSelector, timeout: float | None = None) -> Any:
        d0, t0 = _run_delay_ns(), time.monotonic()
        got = select(self, timeout)
        late = time.monotonic() - t0 - (timeout if timeout is not None else float("inf"))
        if late > SLOW_S:
            waited = (_run_delay_ns() - d0) / 1e6
            records.append({"kind": "select", "at": t0, "ms": late * 1e3, "cpu_wait_ms": waited})
        return got

    asyncio.events.Handle._run = traced_run  # type: ignore[method-assign]
    selectors.EpollSelector.select = traced_select  # type: ignore[method-assign]
    loop_thread = threading.get_ident()

    def dump() -> None:
        assert threading.get_ident() == loop_thread  # atexit runs in the main thread, the loop's
        out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))

    atexit.register(dump)


def summarize(path: Path, start: float, end: float) -> dict[str, Any]:
    """The slow turns recorded in [start, end]: how many of each cause, the longest, and what ran
    in the slowest turns that held the CPU."""
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
    rows = [r for r in rows if start <= r["at"] <= end]
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        if r["kind"] == "callback":
            groups["on CPU" if r["cpu_ms"] >= 0.5 * r["ms"] else "off CPU"].append(r)
        else:
            groups["late wake-up, CPU wait" if r["cpu_wait_ms"] >= 0.5 * r["ms"] else "late wake-up, other"].append(r)
    whats = collections.Counter(r["what"] for r in groups.get("on CPU", []))
    return {
        "turns": len(rows),
        "groups": {k: (len(v), max(r["ms"] for r in v)) for k, v in groups.items()},
        "on_cpu_top": whats.most_common(3),
    }


if __name__ == "__main__":
    install(Path(sys.argv.pop(1)))
    from sidecar.cli import main  # here: the bench imports summarize without the sidecar

    sys.exit(main())
