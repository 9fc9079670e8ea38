"""Memory of a process tree, read from /proc: RSS and PSS (shared pages split among their users).

RSS double-counts shared mappings (the arena is mapped by the sidecar, its workers and every engine
rank), so PSS from `smaps_rollup` is the honest figure for "how much memory does this tree hold".
Shared by the sidecar's metrics, the engine's health answer and the benchmarks: the ground floor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TreeMemory:
    processes: int
    rss_bytes: int
    pss_bytes: int


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    seen: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.append(p)
        stack.extend(children(p))
    return seen


def _rollup(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None  # gone, or not ours to read
    rss = pss = 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def tree_memory(pid: int | None = None) -> TreeMemory:
    """RSS and PSS summed over `pid` (default: this process) and all its descendants."""
    count = rss = pss = 0
    for p in tree(os.getpid() if pid is None else pid):
        got = _rollup(p)
        if got is not None:
            count += 1
            rss += got[0]
            pss += got[1]
    return TreeMemory(count, rss, pss)
