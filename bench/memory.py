"""Memory of process trees: summed RSS and PSS, sampled in a thread while a benchmark runs.

`MemorySampler` sums RSS and PSS over every process of the given trees at a fixed interval
(50 ms by default) in a thread, and keeps the series and the peaks of the sums: RSS from the kernel's
counters in `/proc/<pid>/status` at every tick, PSS from them and each process's sharing discount read
from `smaps_rollup` every 0.25 s or less often (reading it every tick would cost a core for a 10 GiB
tree; see the class). RSS counts a shared page (the arena, shared libraries) once in every process that maps
it; PSS splits it among them, so a PSS sum over all trees counts it once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from preprocess.procmem import tree_memory


@dataclass(frozen=True, slots=True)
class MemorySample:
    t: float  # seconds since the sampler started
    rss: int
    pss: int
    processes: int


def _status_rss(pid: int) -> tuple[int, int, int] | None:
    """(RssAnon, RssFile, RssShmem) in bytes from /proc/<pid>/status: the kernel's counters, constant time."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None  # gone
    got = {}
    for line in text.splitlines():
        if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
            key, value = line.split(":", 1)
            got[key] = int(value.split()[0]) * 1024
    if len(got) < 3:
        return None  # a kernel thread or a zombie: no memory
    return got["RssAnon"], got["RssFile"], got["RssShmem"]


def _rollup(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
            out[key] = int(value.split()[0]) * 1024
    return out if "Pss" in out else None


class MemorySampler:
    """Summed RSS and PSS of the process trees rooted at `pids`, every `interval_s`, in a thread.

    Reading `smaps_rollup` walks a process's page tables: ~30 ms per GiB of RSS here, so reading it
    for a 10 GiB engine every 50 ms would take a whole core from the processes being measured. So:
    - RSS comes from `/proc/<pid>/status` (the kernel's counters, constant time) at every tick, split
      into anonymous, file and shared-memory pages;
    - PSS at a tick = sum over processes of (anonymous + file pages - that process's sharing discount)
      + the largest shared-memory RSS of any one process. The discount (pages shared with other
      processes: libraries, mostly) is read from `smaps_rollup` every `pss_interval_s`, or less often
      when reading it is slow (at most ~10% of one core); a process not yet read gets none. Shared
      memory is counted once: all of it is the arena, which its owner (the sidecar) has pre-touched
      in full, so the others map a subset of the owner's pages and their sum of PSS is the owner's RSS.
    `max_estimate_error` is the largest gap between that estimate and the exact PSS sum at the moments
    both are known (before a discount is refreshed); the process list is refreshed every 0.5 s.
    """

    def __init__(
        self, pids: Sequence[int], interval_s: float = 0.05, pss_interval_s: float = 0.25, max_seconds: float = 3600
    ) -> None:
        self.roots = list(pids)
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self.max_seconds = max_seconds
        self.samples: list[MemorySample] = []
        self.exact: list[MemorySample] = []
        self.max_estimate_error = 0
        self._discount: dict[int, int] = {}
        self._pids: list[int] = []
        self._next_tree = self._next_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._t0 = time.monotonic()

    def sample(self) -> MemorySample:
        """One exact sample (smaps_rollup of every process): slow for big trees, use it at idle."""
        rss = pss = count = 0
        for root in self.roots:
            memory = tree_memory(root)
            rss += memory.rss_bytes
            pss += memory.pss_bytes
            count += memory.processes
        return MemorySample(time.monotonic() - self._t0, rss, pss, count)

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_tree:
            from preprocess.procmem import tree  # noqa: PLC0415

            self._pids = [p for root in self.roots for p in tree(root)]
            self._next_tree = now + 0.5
        rss_of = {pid: r for pid in self._pids if (r := _status_rss(pid)) is not None}

        def estimate() -> int:
            private = sum(max(0, a + f - self._discount.get(pid, 0)) for pid, (a, f, _) in rss_of.items())
            return private + max((shm for _, _, shm in rss_of.values()), default=0)

        pss = estimate()
        t = now - self._t0
        if now >= self._next_pss:
            known = bool(self.exact) and all(pid in self._discount for pid in rss_of)
            started = time.monotonic()
            exact_rss = exact_pss = 0
            for pid, (_, _, shm) in rss_of.items():
                got = _rollup(pid)
                if got is None:
                    continue
                exact_rss += got["Rss"]
                exact_pss += got["Pss"]
                unshared = got.get("Pss_Anon", 0) + got.get("Pss_File", 0)
                self._discount[pid] = max(0, got["Rss"] - shm - unshared)
            self._next_pss = now + max(self.pss_interval_s, 10 * (time.monotonic() - started))
            if known:
                self.max_estimate_error = max(self.max_estimate_error, abs(pss - exact_pss))
            self.exact.append(MemorySample(t, exact_rss, exact_pss, len(rss_of)))
            pss = estimate()
        self.samples.append(MemorySample(t, sum(sum(r) for r in rss_of.values()), pss, len(rss_of)))

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - self._t0 < self.max_seconds:
            self._tick()
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind: do not try to catch up
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def __enter__(self) -> MemorySampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._next_pss = 0.0
        self._tick()

    @property
    def peak_rss(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    @property
    def peak_pss(self) -> int:
        return max([s.pss for s in self.samples] + [s.pss for s in self.exact], default=0)

    @property
    def mean_interval_s(self) -> float:
        if len(self.samples) < 2:
            return float("nan")
        return (self.samples[-1].t - self.samples[0].t) / (len(self.samples) - 1)
