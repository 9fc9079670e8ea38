"""Benchmark processes: the engine, the sidecar and helper servers as subprocesses on loopback.

`engine()`, `sidecar()` and `echo_upstream()` start `mm-sidecar engine|serve|echo-upstream`
as subprocesses on free 127.0.0.1 ports, each in its own session (process group), wait until they
answer, and stop them in `finally`: SIGTERM (the engine's launcher stops its ranks, the sidecar drains
and stops its workers), SIGKILL to the whole group after a deadline. A sidecar gets a segment name of
its own; after it stops, no `/dev/shm/mm-sidecar-<name>-*` may remain (`LeakError` otherwise, after
removing it). Every child runs with `OMP_NUM_THREADS=1` (2-core machines: ranks, workers and the
client would otherwise oversubscribe the cores) and `HF_HUB_OFFLINE=1`. `python_service()` does the
same for a helper server of a benchmark's own (bench.hostile_mix's upstream).
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from .common import REPO

CHILD_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
_STOP_TIMEOUT_S = 30.0


class LeakError(RuntimeError):
    """A benchmark left a process or a shared-memory segment behind (it was cleaned up, loudly)."""


def _ephemeral_ports() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


_port_rng = random.Random()


_PORTS = random.Random()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    The kernel's own pick (bind to port 0) comes from the ephemeral range, the one outgoing connections
    take their source ports from: between this pick and the server's bind, one of the many connections
    a test makes (a health probe, vLLM's ZMQ sockets) could take it (seen in CI: a sidecar under `run`
    failed with EADDRINUSE). Below that range only listeners compete, and the bind here catches those."""
    ephemeral = _ephemeral_ports()
    for _ in range(200):
        port = _PORTS.randrange(10000, min(ephemeral.start, 32768))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range after 200 tries")


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


_PR_SET_CHILD_SUBREAPER = 36


def adopt_orphans() -> None:
    """Make this benchmark process the reaper of its services' orphans (Linux PR_SET_CHILD_SUBREAPER).

    vLLM's EngineCore and worker outlive its API server by a moment at shutdown; init would reap them,
    taking their CPU time out of os.times(), and CpuLoad would count the engine's work as other
    people's (measured: ~30% of the machine). Adopted, they are reaped in stop_service and their CPU
    time is ours. For benchmark mains only: a test process must not collect other tests' orphans."""
    import ctypes  # noqa: PLC0415

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_adopted(pgid: int) -> None:
    """Wait for the exited members of group `pgid` that became our children (adopted orphans)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        if state == "Z" and ppid == me and pgrp == pgid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def start_service(
    name: str,
    argv: Sequence[str],
    url: str,
    log_dir: Path,
    *,
    cpus: frozenset[int] | None = None,
    env: dict[str, str] | None = None,
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
            env={**os.environ, **CHILD_ENV, **(env or {})},
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
        _reap_adopted(pgid)  # an adopted member that exited is a zombie of ours: the group lives on
        if not _group_alive(pgid):
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.2)
            _reap_adopted(pgid)
            if _group_alive(pgid):
                raise LeakError(f"{service.name}: processes of group {pgid} survive SIGKILL")
            raise LeakError(f"{service.name}: processes of group {pgid} outlived their leader (killed)")
        time.sleep(0.05)


def ensure_model(directory: str | None) -> Path:
    from engine.tiny import default_model_dir, ensure_tiny_model  # noqa: PLC0415

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
    argv = [_python(), "-m", "mm_sidecar.cli", "--log-level", "WARNING", "engine"]
    argv += ["--model", str(model_dir), "--tp", str(tp), "--port", str(port)]
    service = start_service(f"engine-{port}", argv, f"http://127.0.0.1:{port}", log_dir, cpus=cpus)
    with _running(service, "/health", start_timeout_s if wait else None):
        yield service


VLLM_MODEL_NAME = "tiny"


def vllm_python() -> str:
    """The interpreter that has vLLM: $MM_SIDECAR_VLLM_PYTHON (a GPU user's own CUDA vLLM), else the
    project's .venv-vllm (`make vllm-env`)."""
    configured = os.environ.get("MM_SIDECAR_VLLM_PYTHON")
    if configured:
        return configured
    local = REPO / ".venv-vllm" / "bin" / "python"
    if not local.exists():
        raise RuntimeError(f"no vLLM: {local} is missing (run `make vllm-env`) and MM_SIDECAR_VLLM_PYTHON is unset")
    return str(local)


def _vllm_serving(max_model_len: int, images_per_prompt: int, kv_cache_gb: float) -> tuple[list[str], dict[str, str]]:
    """The vLLM arguments (each option joined to its value by `=`) and environment with which both
    `vllm()` and `vllm_engine()` serve the tiny model."""
    limit = orjson.dumps({"image": images_per_prompt}).decode()
    args = [f"--served-model-name={VLLM_MODEL_NAME}", f"--max-model-len={max_model_len}", "--dtype=float32"]
    args += ["--enforce-eager", f"--limit-mm-per-prompt={limit}"]
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gb:g}", "VLLM_NO_USAGE_STATS": "1"}
    return args, env


@contextlib.contextmanager
def vllm(
    model_dir: Path,
    log_dir: Path,
    *,
    processor_cache_gb: float | None = 0,
    kv_cache_gb: float = 2,
    max_model_len: int = 8192,
    images_per_prompt: int = 2,
    start_timeout_s: float = 300,
    cpus: frozenset[int] | None = None,
) -> Iterator[Service]:
    """vLLM's OpenAI server (API server, EngineCore, CPU worker) on `model_dir`, served as "tiny".

    `processor_cache_gb=0` turns vLLM's multimodal processor cache off: it keeps every image's inputs
    (4 GiB by default) whatever the gate, which would hide what the gate bounds; None keeps vLLM's
    default. The recipe and its pitfalls are in FACTS.md.
    """
    port = free_port()
    serving, env = _vllm_serving(max_model_len, images_per_prompt, kv_cache_gb)
    argv = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--host", "127.0.0.1", "--port", str(port), *serving]
    if processor_cache_gb is not None:
        argv += ["--mm-processor-cache-gb", str(processor_cache_gb)]
    env["VLLM_TARGET_DEVICE"] = "cpu"
    service = start_service(f"vllm-{port}", argv, f"http://127.0.0.1:{port}", log_dir, cpus=cpus, env=env)
    with _running(service, "/health", start_timeout_s):
        yield service


@contextlib.contextmanager
def vllm_engine(
    model_dir: Path,
    log_dir: Path,
    *,
    tp: int = 1,
    kv_cache_gb: float = 2,
    max_model_len: int = 8192,
    images_per_prompt: int = 2,
    probe_log: Path | None = None,
    extra_args: Sequence[str] = (),
    start_timeout_s: float = 300,
    cpus: frozenset[int] | None = None,
    pixels: str = "float32",
) -> Iterator[Service]:
    """`mm-sidecar vllm-engine` (vLLM's OpenAI server with the offload plugin, engine/vllm_offload.py)
    run by vLLM's interpreter, serving `model_dir` as "tiny" as `vllm()` does; healthy (its /health
    carries the shm token) on entry.

    `probe_log`: the plugin appends a line there for every HF-processor call and arena copy in vLLM's
    API server. `extra_args`: more vLLM arguments, one token each. `pixels`: vllm-engine --pixels (the
    sidecar's preprocess.transport_dtype).
    """
    port = free_port()
    serving, env = _vllm_serving(max_model_len, images_per_prompt, kv_cache_gb)
    argv = [vllm_python(), "-m", "mm_sidecar.cli", "--log-level", "WARNING", "vllm-engine"]
    argv += ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--tp", str(tp)]
    argv += ["--pixels", pixels, *(f"--vllm-arg={token}" for token in (*serving, *extra_args))]
    if probe_log is not None:
        env["MM_SIDECAR_VLLM_PROBE_LOG"] = str(probe_log)
    service = start_service(f"vllm-engine-{port}", argv, f"http://127.0.0.1:{port}", log_dir, cpus=cpus, env=env)
    with _running(service, "/health", start_timeout_s):
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
    trace_loop: Path | None = None,
) -> Iterator[Service]:
    """`mm-sidecar serve` with `config` (ports and segment name filled in), ready (/readyz 200) on entry.

    `uvloop=True` runs the unchanged sidecar on uvloop's event loop (bench/uvloop_serve.py);
    `trace_loop` records its slow loop turns there, written as it exits (bench/loop_trace.py).
    """
    instance = f"bench{os.getpid()}x{next(_instances)}"
    port = free_port()
    merged: dict[str, Any] = {key: dict(value) for key, value in config.items()}
    merged.setdefault("server", {}).update(host="127.0.0.1", port=port, shutdown_timeout_s=5)
    merged.setdefault("shm", {})["name"] = instance
    path = log_dir / f"sidecar-{instance}.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    module = ["bench.uvloop_serve"] if uvloop else ["sidecar.cli"]
    if trace_loop is not None:
        if uvloop:
            raise ValueError("trace_loop traces asyncio's own loop, not uvloop's")
        module = ["bench.loop_trace", str(trace_loop)]
    argv = [_python(), "-m", *module, "--log-level", "WARNING", "serve", "--config", str(path)]
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
