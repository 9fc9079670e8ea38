"""`mm-sidecar run` supervises its engine: a real SIGKILL of engine rank 1, and run brings it back.

The whole main job as a user runs it (the command line, the reference engine with 2 ranks, the
sidecar in offload mode in front of it, real processes and shared memory), on a tiny model built
here. The kill is of one rank only, as a crashing rank would die: the launcher stops the other rank
and exits, and `run` must restart the engine while the sidecar stays up, then serve images again.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from .conftest import free_port, image_bytes


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(p) for p in f.read().split())
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait(predicate: Any, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s; run's output:\n{log.read_text()[-4000:]}")


def _status(url: str, body: dict[str, Any] | None = None, timeout: float = 2) -> tuple[int | None, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return None, b""


def _ready(base: str) -> bool:
    return _status(base + "/readyz")[0] == 200


def _not_ready(base: str) -> bool:
    return _status(base + "/readyz")[0] == 503


def _ask(base: str) -> tuple[int | None, bytes]:
    url = "data:image/png;base64," + base64.b64encode(image_bytes(64, 48)).decode()
    body = {
        "model": "tiny",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
            }
        ],
    }
    return _status(base + "/v1/chat/completions", body, timeout=120)


def test_run_restarts_a_killed_engine_and_serves_again(tmp_path: Path) -> None:
    from engine.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    port, engine_port = free_port(), free_port()
    instance = f"run{os.getpid()}"
    config = yaml.safe_load(Path("config/sidecar.yaml").read_text())
    config["server"].update(port=port, shutdown_timeout_s=5)
    config["upstream"]["url"] = f"http://127.0.0.1:{engine_port}"
    config["preprocess"]["workers"] = 1
    config["gate"]["max_bytes"] = "64MiB"
    config["shm"]["name"] = instance
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "run.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "mm_sidecar.cli", "run", "--config", str(path), "--model", str(model)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        _wait(lambda: _ready(base), 240, "the sidecar ready in front of the engine", log)
        assert _ask(base)[0] == 200
        launchers = _children(run.pid)
        engine = next(pid for pid in launchers if len(_children(pid)) >= 2)
        ranks = _children(engine)
        os.kill(ranks[1], signal.SIGKILL)  # rank 1 (spawned after rank 0)

        # The launcher stops rank 0 and exits; the sidecar stays up but not ready...
        _wait(lambda: not _alive(engine), 60, "the old engine gone", log)
        assert not any(_alive(pid) for pid in ranks)
        _wait(lambda: _not_ready(base), 30, "/readyz 503 while the engine is down", log)
        assert _status(base + "/healthz")[0] == 200
        assert run.poll() is None
        # ...until run has started a new engine and the sidecar has verified it again.
        _wait(lambda: _ready(base), 240, "the sidecar ready again after the restart", log)
        status, answer = _ask(base)
        assert status == 200, answer
        assert json.loads(answer)["choices"][0]["message"]["content"]
        text = log.read_text()
        assert "the engine exited with" in text and "restarting it in 1 s (restart 1)" in text, text[-3000:]
        # The supervisor logs this on its own health poll, which may come after the sidecar's readiness.
        _wait(lambda: "the engine is healthy again (restart 1)" in log.read_text(), 30, "the healthy line", log)
        new_engine = next(pid for pid in _children(run.pid) if len(_children(pid)) >= 2)
        assert new_engine != engine
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            code = run.wait(90)
        except subprocess.TimeoutExpired:
            run.kill()
            raise
    assert code == 0, log.read_text()[-3000:]
    left = [n for n in os.listdir("/dev/shm") if n.startswith(f"mm-sidecar-{instance}-")]
    assert not left, left
