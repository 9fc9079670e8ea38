"""`mm-sidecar vllm-engine`: vLLM's own OpenAI server as the offload engine (engine/vllm_offload.py).

The command builds vLLM's command line and environment and `exec`s it, so vLLM keeps the pid and the
signals and whatever supervises this command supervises vLLM. It adds what the offload protocol needs:

- ``MM_SIDECAR_VLLM_OFFLOAD=1`` turns the plugin on (it is inert otherwise), ``MM_SIDECAR_SHM_DIR``
  says where the sidecar's arena lives;
- ``--pixels float32`` (the default) adds ``--no-mm-device-do-normalize``: the sidecar sends the
  processor's normalised float32 pixels, which vLLM 0.32 would otherwise normalise again on the
  device; ``--pixels uint8`` (for ``preprocess.transport_dtype: uint8``) adds
  ``--mm-device-do-normalize``: the sidecar sends raw uint8 patches, a quarter of the bytes, and vLLM
  normalises them on the device as it does for the images it processes itself. ``MM_SIDECAR_VLLM_PIXELS``
  tells the plugin's /health which, and the sidecar checks it against its own setting;
- ``--mm-processor-cache-gb 0``: EngineCore's receiver cache would keep every offloaded image's
  tensors (4 GiB by default) and is never hit for them;
- ``--middleware engine.vllm_offload.OffloadHealthMiddleware``: /health carries the shm token;
- on the CPU build: ``VLLM_TARGET_DEVICE=cpu`` when unset, and with ``--tp`` > 1 on fewer NUMA nodes
  than ranks an explicit ``VLLM_CPU_OMP_THREADS_BIND`` (vLLM's automatic binding refuses it).

Other vLLM arguments pass through ``--vllm-arg`` (one token each), except those that break the
contract or that this command owns (`REFUSED`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.vllm_offload import (
    ENABLE_ENV,
    PIXELS,
    PIXELS_ENV,
    PLUGIN_NAME,
    SHM_DIR_ENV,
    UnsupportedVLLM,
    check_vllm_version,
)

API_SERVER = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "engine.vllm_offload.OffloadHealthMiddleware"

# vLLM options a --vllm-arg may not set: name -> why (vLLM spells them with - or _, both are caught).
REFUSED: Mapping[str, str] = {
    "--mm-device-do-normalize": "use vllm-engine --pixels (it sets this to match the sidecar's pixels)",
    "--enable-mm-embeds": "it lets anything that reaches the port send raw embeddings",
    "--mm-processor-cache-gb": "vLLM's receiver cache would keep every offloaded image's tensors and never "
    "hit them (vllm-engine sets 0)",
    "--model": "use vllm-engine --model",
    "--host": "use vllm-engine --host",
    "--port": "use vllm-engine --port",
    "--tensor-parallel-size": "use vllm-engine --tp",
    "-tp": "use vllm-engine --tp",
    "--uds": "the sidecar reaches vllm-engine over TCP (--host, --port)",
}


class EngineCommandError(ValueError):
    """A vllm-engine invocation that cannot work; the message says why (exit 2)."""


@dataclass(frozen=True, slots=True)
class EngineCommand:
    argv: tuple[str, ...]
    env: dict[str, str]

    def describe(self) -> str:
        added = {k: v for k, v in self.env.items() if os.environ.get(k) != v}
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(added.items()))
        return f"{assignments} {shlex.join(self.argv)}".strip()


def _option_name(token: str) -> str:
    name = token.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def check_vllm_args(vllm_args: Sequence[str]) -> None:
    for token in vllm_args:
        reason = REFUSED.get(_option_name(token))
        if reason is not None:
            raise EngineCommandError(f"--vllm-arg {token}: refused: {reason}")


def vllm_distribution() -> str | None:
    """The name of the installed distribution that provides `vllm` ("vllm", "vllm-cpu"), or None."""
    names = importlib.metadata.packages_distributions().get("vllm") or []
    return names[0] if names else None


def check_vllm_installed(python: str = sys.executable) -> str:
    """The vLLM distribution importable here, after checking its version; EngineCommandError if none."""
    dist = vllm_distribution() if importlib.util.find_spec("vllm") is not None else None
    if dist is None:
        raise EngineCommandError(
            f"vLLM is not importable by {python}: run it with .venv-vllm/bin/mm-sidecar "
            "(make vllm-env), or with a python that has vLLM 0.32 and this project installed"
        )
    try:
        check_vllm_version(importlib.metadata.version(dist))
    except UnsupportedVLLM as exc:
        raise EngineCommandError(str(exc)) from None
    return dist


def numa_nodes() -> int:
    nodes = [p for p in Path("/sys/devices/system/node").glob("node[0-9]*") if p.is_dir()]
    return max(len(nodes), 1)


def omp_bind(cpus: Sequence[int], tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `tp` CPU ranks: `cpus` split into `tp` contiguous groups
    ("0,1|2,3"); with fewer CPUs than ranks, ranks share them round-robin."""
    ordered = sorted(cpus)
    if len(ordered) < tp:
        return "|".join(str(ordered[i % len(ordered)]) for i in range(tp))
    size, extra = divmod(len(ordered), tp)
    groups, start = [], 0
    for rank in range(tp):
        end = start + size + (1 if rank < extra else 0)
        groups.append(",".join(str(c) for c in ordered[start:end]))
        start = end
    return "|".join(groups)


def build_command(
    *,
    model: str,
    port: int,
    host: str = "127.0.0.1",
    tp: int = 1,
    shm_dir: str = "/dev/shm",
    vllm_args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    cpu_build: bool = False,
    python: str = sys.executable,
    pixels: str = "float32",
) -> EngineCommand:
    """vLLM's OpenAI server command line and environment for offload; EngineCommandError if refused."""
    if tp < 1:
        raise EngineCommandError(f"--tp must be >= 1, got {tp}")
    if pixels not in PIXELS:
        raise EngineCommandError(f"--pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
    check_vllm_args(vllm_args)
    env = dict(os.environ if environ is None else environ)
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and PLUGIN_NAME not in [p.strip() for p in plugins.split(",")]:
        raise EngineCommandError(
            f"VLLM_PLUGINS={plugins!r} leaves out {PLUGIN_NAME}, the offload plugin: add it to the list"
        )
    env[ENABLE_ENV] = "1"
    env[SHM_DIR_ENV] = shm_dir
    env[PIXELS_ENV] = pixels
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    if cpu_build:
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    cpu = env.get("VLLM_TARGET_DEVICE") == "cpu"
    if cpu and tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env and numa_nodes() < tp:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind(sorted(os.sched_getaffinity(0)), tp)
    argv = [python, "-m", API_SERVER, "--model", model, "--host", host, "--port", str(port)]
    normalize = "--mm-device-do-normalize" if pixels == "uint8" else "--no-mm-device-do-normalize"
    argv += ["--tensor-parallel-size", str(tp), normalize, "--mm-processor-cache-gb", "0"]
    argv += ["--middleware", MIDDLEWARE, *vllm_args]
    return EngineCommand(tuple(argv), env)


def exec_engine(command: EngineCommand) -> None:
    """Replace this process with vLLM (never returns)."""
    print(f"vllm-engine: {command.describe()}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvpe(command.argv[0], list(command.argv), command.env)
