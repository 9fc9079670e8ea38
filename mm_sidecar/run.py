"""`mm-sidecar run`: the reference engine and the sidecar in front of it, the engine supervised.

The engine is a launcher process and its tensor-parallel ranks; when any rank dies the launcher
stops the others and exits non-zero (an engine is all ranks or nothing). `run` starts it in a
process group of its own, waits for its /health, then serves the sidecar in this process, and
watches the engine for as long as the sidecar runs:

- The engine exits while the sidecar serves (a rank was killed, it crashed): `run` logs it and
  starts it again after a backoff of 1 s, doubling up to 30 s. The sidecar stays up meanwhile:
  /healthz 200, /readyz 503, requests 502 (offload mode: 503 until the engine is verified); in
  offload mode it re-verifies the new engine's shared-memory token on its own and goes ready
  again. An engine healthy for `healthy_reset_s` resets the backoff.
- `max_restarts` restarts in a row that never became healthy: `run` stops the sidecar (draining as
  on SIGTERM) and exits 1, so its own supervisor (systemd, Kubernetes, a shell loop) takes over;
  an engine that cannot start is not fixed by restarting it forever.
- Ctrl-C / SIGTERM: the sidecar drains first, then the engine is stopped (it must outlive the
  requests the sidecar is finishing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from sidecar.app import serve
from sidecar.app_keys import STATE
from sidecar.config import Config

log = logging.getLogger("mm_sidecar.run")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    first_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_restarts: int = 5  # in a row, none of them healthy, before run gives up
    start_timeout_s: float = 300.0  # an engine not healthy by then counts as a failed start
    healthy_reset_s: float = 60.0  # healthy this long: the next crash starts the backoff over


class EngineSupervisor:
    """One engine process at a time, restarted with backoff while the sidecar runs."""

    def __init__(self, argv: Sequence[str], health_url: str, policy: RestartPolicy) -> None:
        self.argv = list(argv)
        self.health_url = health_url
        self.policy = policy
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0  # since the engine was last healthy for healthy_reset_s
        self._stopping = asyncio.Event()  # an event, not a bool: it changes across the awaits below

    async def start(self) -> None:
        # Its own session: Ctrl-C reaches the sidecar, which stops the engine after draining.
        self.proc = await asyncio.create_subprocess_exec(*self.argv, start_new_session=True)

    async def wait_healthy(self) -> bool:
        """True once /health answers 200; False if the engine exits or start_timeout_s passes first."""
        assert self.proc is not None
        try:
            async with aiohttp.ClientSession() as session, asyncio.timeout(self.policy.start_timeout_s):
                while self.proc.returncode is None:
                    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                        async with session.get(self.health_url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                            if resp.status == 200:
                                return True
                    await asyncio.sleep(0.5)
        except TimeoutError:
            log.error("the engine was not healthy within %.0f s", self.policy.start_timeout_s)
        return False

    async def watch(self, app: web.Application) -> None:
        """Restart the engine whenever it exits; stop the sidecar with exit code 1 if it cannot."""
        loop = asyncio.get_running_loop()
        healthy_since = loop.time()
        while not self._stopping.is_set():
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping.is_set():
                return
            if loop.time() - healthy_since >= self.policy.healthy_reset_s:
                self.restarts = 0
            if self.restarts >= self.policy.max_restarts:
                log.error(
                    "the engine exited with %s after %d restarts that never became healthy; stopping (exit 1)",
                    code,
                    self.restarts,
                )
                app[STATE].exit_code = 1
                app[STATE].stop.set()
                return
            backoff = min(self.policy.first_backoff_s * 2**self.restarts, self.policy.max_backoff_s)
            self.restarts += 1
            log.error("the engine exited with %s; restarting it in %.0f s (restart %d)", code, backoff, self.restarts)
            await asyncio.sleep(backoff)
            if self._stopping.is_set():
                return
            await self.start()
            if await self.wait_healthy():
                log.info("the engine is healthy again (restart %d)", self.restarts)
                healthy_since = loop.time()
            else:
                healthy_since = -float("inf")  # not a healthy run: the restart count stands
                if self.proc is not None and self.proc.returncode is None:
                    self._signal(signal.SIGKILL)  # hung in start-up: the next round replaces it

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # the launcher and its ranks

    async def stop(self) -> None:
        self._stopping.set()
        if self.proc is None or self.proc.returncode is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await self.proc.wait()


def _banner(address: str, config: Config) -> str:
    return (
        f"\nmm-sidecar is serving on {address} (offload mode) in front of the reference engine on "
        f"{config.upstream.url}.\n"
        f"  try:     curl -s {address}/v1/chat/completions -H 'content-type: application/json' "
        '-d \'{"model":"tiny","max_tokens":8,"messages":[{"role":"user","content":'
        '[{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4'
        'nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"}},{"type":"text","text":"hi"}]}]}\'\n'
        f"  metrics: {address}{config.metrics.path}\n"
        f"  demo:    .venv/bin/mm-sidecar demo --url {address}\n"
        "  The engine is restarted if it dies; Ctrl-C stops everything.\n"
    )


async def run_main_job(config: Config, model_dir: Path, policy: RestartPolicy) -> int:
    """The main job: the reference engine (2 ranks) and the sidecar in front of it, until Ctrl-C."""
    parts = urlsplit(config.upstream.url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        raise SystemExit(f"mm-sidecar run: upstream.url must be http://127.0.0.1:PORT, got {config.upstream.url}")
    from engine.tiny import ensure_tiny_model  # noqa: PLC0415 - torch only once run is asked for

    model = await asyncio.to_thread(ensure_tiny_model, model_dir)
    print(f"model: {model}", flush=True)
    argv = [sys.executable, "-m", "mm_sidecar.cli", "engine", "--model", str(model), "--tp", "2"]
    argv += ["--host", parts.hostname, "--port", str(parts.port)]
    engine = EngineSupervisor(argv, config.upstream.url + config.upstream.health_path, policy)
    await engine.start()
    watcher: asyncio.Task[None] | None = None
    try:
        print("starting the reference engine (2 ranks)...", flush=True)
        if not await engine.wait_healthy():
            code = engine.proc.returncode if engine.proc is not None else None
            raise SystemExit(f"mm-sidecar run: the engine did not start (exit code {code})")

        def on_app(app: web.Application) -> None:
            nonlocal watcher
            watcher = asyncio.create_task(engine.watch(app))

        return await serve(config, ready=lambda address: print(_banner(address, config), flush=True), on_app=on_app)
    finally:
        await engine.stop()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
