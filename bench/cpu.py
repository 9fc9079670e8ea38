"""The CPUs: how many this process may use, how a pod's containers split them, what the machine spent on them.

`Placement` gives the sidecar CPUs of its own and the engine and client the rest. `CpuLoad` compares
the CPU time the whole machine spent (`/proc/stat`) with what this process and its reaped children
spent (`os.times`): the rest is other people's work on a shared machine, and a run where it is large is
marked BUSY in RESULTS.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field


def nproc() -> int:
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True, slots=True)
class Placement:
    """CPU sets for a pod's containers on one machine: the sidecar (its loop and workers) on its own
    CPUs, the engine and the benchmark's client on the rest, as Kubernetes' static CPU manager gives a
    Guaranteed pod's containers exclusive cores. Without it every process competes for every CPU."""

    sidecar: frozenset[int]
    engine: frozenset[int]

    @classmethod
    def split(cls, sidecar_cpus: int = 1) -> Placement:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) <= sidecar_cpus:
            raise ValueError(f"a split placement needs more than {sidecar_cpus} CPU(s), this process has {len(cpus)}")
        return cls(frozenset(cpus[:sidecar_cpus]), frozenset(cpus[sidecar_cpus:]))

    def describe(self) -> str:
        return f"sidecar on CPU {_cpu_list(self.sidecar)}, engine and client on CPU {_cpu_list(self.engine)}"


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    idle = fields[3] + fields[4]
    return sum(fields[:8]) - idle


@dataclass
class CpuLoad:
    """CPU seconds the machine spent during the run that this process and its children did not."""

    wall_s: float = 0.0
    total_cpu_s: float = 0.0
    own_cpu_s: float = 0.0
    loadavg_start: float = 0.0
    _t0: float = field(default=0.0, repr=False)
    _busy0: int = field(default=0, repr=False)
    _own0: float = field(default=0.0, repr=False)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> CpuLoad:
        self.loadavg_start = os.getloadavg()[0]
        self._t0, self._busy0, self._own0 = time.monotonic(), _busy_jiffies(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.monotonic() - self._t0
        self.total_cpu_s = (_busy_jiffies() - self._busy0) / os.sysconf("SC_CLK_TCK")
        self.own_cpu_s = self._own() - self._own0

    @property
    def foreign_cpu_s(self) -> float:
        return max(0.0, self.total_cpu_s - self.own_cpu_s)

    @property
    def foreign_share(self) -> float:
        capacity = self.wall_s * nproc()
        return self.foreign_cpu_s / capacity if capacity > 0 else 0.0

    @property
    def busy(self) -> bool:
        # Not the load average: it lags, and counts this benchmark's own processes of a minute ago.
        return self.foreign_share > 0.10

    def describe(self) -> str:
        verdict = "**BUSY: other work competed for the CPUs; treat timings as noisy**" if self.busy else "quiet"
        return (
            f"{verdict} (other processes used {self.foreign_cpu_s:.1f} CPU-s = {100 * self.foreign_share:.0f}% of "
            f"{nproc()} CPUs x {self.wall_s:.0f} s; 1-min load average at start {self.loadavg_start:.2f})"
        )
