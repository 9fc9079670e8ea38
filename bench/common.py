"""What every benchmark shares: subprocesses on loopback, memory sampling, statistics, tables, RESULTS.md, plots.

Processes. `engine()`, `sidecar()` and `echo_upstream()` start `mm-sidecar engine|serve|echo-upstream`
as subprocesses on free 127.0.0.1 ports, each in its own session (process group), wait until they
answer, and stop them in `finally`: SIGTERM (the engine's launcher stops its ranks, the sidecar drains
and stops its workers), SIGKILL to the whole group after a deadline. A sidecar gets a segment name of
its own; after it stops, no `/dev/shm/mm-sidecar-<name>-*` may remain (`LeakError` otherwise, after
removing it). Every child runs with `OMP_NUM_THREADS=1` (2-core machines: ranks, workers and the
client would otherwise oversubscribe the cores) and `HF_HUB_OFFLINE=1`. `python_service()` does the
same for a helper server of a benchmark's own (bench.hostile_mix's upstream).

Memory. `MemorySampler` sums RSS and PSS over every process of the given trees at a fixed interval
(50 ms by default) in a thread, and keeps the series and the peaks of the sums: RSS from the kernel's
counters in `/proc/<pid>/status` at every tick, PSS from them and each process's sharing discount read
from `smaps_rollup` every 0.25 s or less often (reading it every tick would cost a core for a 10 GiB
tree; see the class). RSS counts a shared page (the arena, shared libraries) once in every process that maps
it; PSS splits it among them, so a PSS sum over all trees counts it once.

Machine load. `CpuLoad` compares the CPU time the whole machine spent (`/proc/stat`) with what this
process and its reaped children spent (`os.times`): the rest is other people's work on a shared
machine, and a run where it is large is marked BUSY in RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import hashlib
import importlib.metadata
import io
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml
from PIL import Image

from preprocess.procmem import tree_memory

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
GiB = 1 << 30
MiB = 1 << 20
CHILD_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
_STOP_TIMEOUT_S = 30.0


class LeakError(RuntimeError):
    """A benchmark left a process or a shared-memory segment behind (it was cleaned up, loudly)."""


# -- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _python() -> str:
    return sys.executable


def start_service(
    name: str, argv: Sequence[str], url: str, log_dir: Path, *, cpus: frozenset[int] | None = None
) -> Service:
    """`argv` as a service in its own session; on `cpus` only when given (its children inherit them)."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **CHILD_ENV},
            start_new_session=True,  # its own process group: stop() can reach every descendant
        )
    if cpus is not None:
        # Set before the interpreter has started anything: the engine's ranks and the sidecar's
        # workers are spawned seconds later and inherit it.
        os.sched_setaffinity(proc.pid, cpus)
    return Service(name, proc, url, log_path)


def wait_http(service: Service, path: str, timeout_s: float) -> dict[str, Any]:
    """Poll `service.url + path` until it answers 200 (its JSON body), the process exits, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if service.proc.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with {service.proc.returncode} during start-up:\n{service.log_tail()}"
            )
        try:
            with urllib.request.urlopen(service.url + path, timeout=2) as resp:
                if resp.status == 200:
                    body = resp.read()
                    try:
                        parsed = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        return {}
                    return parsed if isinstance(parsed, dict) else {}
        except (urllib.error.URLError, OSError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} did not answer {path} in {timeout_s:.0f} s:\n{service.log_tail()}")
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_service(service: Service, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL to its whole process group after `timeout_s`; wait until the group is gone."""
    proc = service.proc
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"[bench] {service.name} ignored SIGTERM for {timeout_s:.0f} s: SIGKILL", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(10)
    deadline = time.monotonic() + 10
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
            if _group_alive(pgid):
                raise LeakError(f"{service.name}: processes of group {pgid} survive SIGKILL")
            raise LeakError(f"{service.name}: processes of group {pgid} outlived their leader (killed)")
        time.sleep(0.05)


def default_model_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mm-sidecar" / "tiny-qwen2-vl"


def ensure_model(directory: str | None) -> Path:
    from engine.tiny import ensure_tiny_model  # noqa: PLC0415 - imports transformers

    return ensure_tiny_model(Path(directory) if directory else default_model_dir())


@contextlib.contextmanager
def engine(
    model_dir: Path,
    log_dir: Path,
    *,
    tp: int = 2,
    wait: bool = True,
    start_timeout_s: float = 180,
    cpus: frozenset[int] | None = None,
) -> Iterator[Service]:
    """The reference engine (`tp` ranks, gloo) on a free port; stopped (and every rank gone) on exit.

    `wait=False` yields at once (the caller starts a sidecar meanwhile and waits for both).
    """
    port = free_port()
    argv = [_python(), "-m", "sidecar.cli", "--log-level", "WARNING", "engine"]
    argv += ["--model", str(model_dir), "--tp", str(tp), "--port", str(port)]
    service = start_service(f"engine-{port}", argv, f"http://127.0.0.1:{port}", log_dir, cpus=cpus)
    with _running(service, "/health", start_timeout_s if wait else None):
        yield service


@contextlib.contextmanager
def _running(service: Service, health_path: str, timeout_s: float | None) -> Iterator[None]:
    """Wait for `service` to answer `health_path` (unless `timeout_s` is None); stop it on the way out."""
    try:
        if timeout_s is not None:
            wait_http(service, health_path, timeout_s)
        yield
    finally:
        stop_service(service)


_instances = iter(range(1, 1 << 30))


def _segments(instance: str) -> list[str]:
    return glob.glob(f"/dev/shm/mm-sidecar-{instance}-*")


@contextlib.contextmanager
def sidecar(
    config: dict[str, Any],
    log_dir: Path,
    *,
    uvloop: bool = False,
    start_timeout_s: float = 180,
    cpus: frozenset[int] | None = None,
) -> Iterator[Service]:
    """`mm-sidecar serve` with `config` (ports and segment name filled in), ready (/readyz 200) on entry.

    `uvloop=True` runs the unchanged sidecar on uvloop's event loop (bench/uvloop_serve.py).
    """
    instance = f"bench{os.getpid()}x{next(_instances)}"
    port = free_port()
    merged: dict[str, Any] = {key: dict(value) for key, value in config.items()}
    merged.setdefault("server", {}).update(host="127.0.0.1", port=port, shutdown_timeout_s=5)
    merged.setdefault("shm", {})["name"] = instance
    path = log_dir / f"sidecar-{instance}.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    module = "bench.uvloop_serve" if uvloop else "sidecar.cli"
    argv = [_python(), "-m", module, "--log-level", "WARNING", "serve", "--config", str(path)]
    service = start_service(f"sidecar-{port}", argv, f"http://127.0.0.1:{port}", log_dir, cpus=cpus)
    try:
        wait_http(service, "/readyz", start_timeout_s)
        yield service
    finally:
        try:
            stop_service(service)
        finally:
            left = _segments(instance)
            for seg in left:
                with contextlib.suppress(OSError):
                    os.unlink(seg)
            if left:
                raise LeakError(f"{service.name} left shared memory behind (removed now): {left}")


@contextlib.contextmanager
def bare_proxy(upstream: str, log_dir: Path) -> Iterator[Service]:
    """`bench/bare_proxy.py` in front of `upstream`: the floor any aiohttp proxy pays (proxy_overhead)."""
    port = free_port()
    argv = [_python(), "-m", "bench.bare_proxy", "--port", str(port), "--upstream", upstream]
    service = start_service(f"bare-proxy-{port}", argv, f"http://127.0.0.1:{port}", log_dir)
    with _running(service, "/health", 60):
        yield service


@contextlib.contextmanager
def echo_upstream(log_dir: Path, *, tokens: int = 1) -> Iterator[Service]:
    """The built-in echo engine (`mm-sidecar echo-upstream`) as a process of its own."""
    port = free_port()
    argv = [_python(), "-m", "sidecar.cli", "--log-level", "WARNING", "echo-upstream"]
    argv += ["--port", str(port), "--tokens", str(tokens)]
    service = start_service(f"echo-{port}", argv, f"http://127.0.0.1:{port}", log_dir)
    with _running(service, "/health", 60):
        yield service


@contextlib.contextmanager
def python_service(
    name: str,
    args: Sequence[str],
    log_dir: Path,
    *,
    health_path: str = "/health",
    start_timeout_s: float = 60,
    cpus: frozenset[int] | None = None,
) -> Iterator[Service]:
    """`python <args>` (a benchmark's own helper server, on the port its args name) as a service: ready
    when `health_path` answers 200, stopped on exit."""
    port = free_port()
    argv = [_python(), *(a.replace("{port}", str(port)) for a in args)]
    service = start_service(f"{name}-{port}", argv, f"http://127.0.0.1:{port}", log_dir, cpus=cpus)
    with _running(service, health_path, start_timeout_s):
        yield service


@contextlib.contextmanager
def log_directory(keep: bool = False) -> Iterator[Path]:
    """A temporary directory for configs and the children's logs (printed path kept when `keep`)."""
    path = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"[bench] logs kept in {path}", file=sys.stderr)
        else:
            for child in path.iterdir():
                with contextlib.suppress(OSError):
                    child.unlink()
            with contextlib.suppress(OSError):
                path.rmdir()


# -- memory ------------------------------------------------------------------------------------------


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


# -- machine and load --------------------------------------------------------------------------------


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


# -- statistics and formatting -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if abs(seconds) >= 10:
        return f"{seconds:.1f} s"
    return f"{seconds * 1000:.2f} ms" if abs(seconds) < 0.01 else f"{seconds * 1000:.0f} ms"


def size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.0f} MiB"


def pct_change(new: float, base: float) -> str:
    if not base:
        return "-"
    return f"{100 * (new - base) / base:+.1f}%"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


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


# -- workloads ---------------------------------------------------------------------------------------


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A deterministic photo-like JPEG (smooth colour fields plus grain), sized like a real photo's file."""
    rng = np.random.default_rng(seed)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    phase = float(seed)
    r = 128 + 90 * np.sin(x / 97 + phase) + 25 * np.cos(y / 61)
    g = 128 + 80 * np.cos(y / 53 + phase) + 30 * np.sin(x / 141)
    b = 128 + 60 * np.sin((x + y) / 150 + phase)
    base = np.stack(np.broadcast_arrays(r, g, b), axis=-1)
    tile = rng.normal(0, 12, (256, 256, 3)).astype(np.float32)
    grain = np.tile(tile, (-(-height // 256), -(-width // 256), 1))[:height, :width]
    pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    import base64  # noqa: PLC0415

    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def chat_body(*, image_url: str | None = None, text: str = "Describe the picture.", max_tokens: int = 1) -> bytes:
    content: Any = text
    if image_url is not None:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    body = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "stream": False,
        "messages": [{"role": "user", "content": content}],
    }
    return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int  # 0: no HTTP answer
    seconds: float
    started: float  # monotonic
    error: str = ""


async def post(session: Any, url: str, body: bytes) -> Outcome:
    """POST a JSON body and read the whole answer; never raises for HTTP or connection errors."""
    import aiohttp  # noqa: PLC0415

    started = time.monotonic()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            await resp.read()
            return Outcome(resp.status, time.monotonic() - started, started)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Outcome(0, time.monotonic() - started, started, f"{type(exc).__name__}: {exc}")


def check_no_leftovers() -> None:
    """Raise LeakError if a child of this process or a segment of one of our sidecars is still there."""
    left = glob.glob(f"/dev/shm/mm-sidecar-bench{os.getpid()}x*")
    from preprocess.procmem import children  # noqa: PLC0415

    kids = children(os.getpid())
    # multiprocessing's own helpers (resource tracker) may be children of a benchmark that used it.
    kids = [k for k in kids if not _is_resource_tracker(k)]
    if left or kids:
        raise LeakError(f"left behind: segments {left}, processes {kids}")


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return True  # gone already
