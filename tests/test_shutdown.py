"""SIGTERM on a real `mm-sidecar serve` process: readiness drops, new requests get 503, in-flight ones finish."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar.echo import EchoEngine

from .conftest import chat_body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Sidecar:
    def __init__(self, proc: asyncio.subprocess.Process, url: str, log: list[str]) -> None:
        self.proc, self.url, self.log = proc, url, log


@contextlib.asynccontextmanager
async def run_sidecar(
    tmp_path: Path, upstream_url: str, extra: dict[str, Any] | None = None, **server: Any
) -> AsyncIterator[Sidecar]:
    config: dict[str, Any] = {
        "server": {"port": free_port(), **server},
        "upstream": {"url": upstream_url},
        "gate": {"max_concurrent": 1},
    }
    for section, values in (extra or {}).items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar.cli", "serve", "--config", str(path), stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                if not line:
                    raise AssertionError("sidecar exited before listening:\n" + "".join(log))
                log.append(line)
                match = re.search(r"listening on (http://\S+)", line)
                if match:
                    break
        reader = asyncio.create_task(_drain(proc.stderr, log))
        yield Sidecar(proc, match.group(1), log)
        reader.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _drain(stream: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stream.readline():
        log.append(line.decode())


@pytest.fixture
async def held_upstream(aiohttp_server: Any) -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def hold(request: web.Request, body: dict[str, Any]) -> None:
        arrived.set()
        await release.wait()

    server = await aiohttp_server(EchoEngine(tokens=2, before_first_chunk=hold).app())
    yield str(server.make_url("")).rstrip("/"), release, arrived
    release.set()


async def test_sigterm_drains_in_flight_and_refuses_new(tmp_path: Path, held_upstream: Any) -> None:
    upstream_url, release, arrived = held_upstream
    async with run_sidecar(tmp_path, upstream_url, shutdown_timeout_s=10) as sc, aiohttp.ClientSession() as http:
        assert (await http.get(sc.url + "/readyz")).status == 200
        inflight = asyncio.create_task(http.post(sc.url + "/v1/chat/completions", json=chat_body()))
        await asyncio.wait_for(arrived.wait(), 5)

        sc.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            while (await http.get(sc.url + "/readyz")).status != 503:
                await asyncio.sleep(0.02)
        resp = await http.post(sc.url + "/v1/chat/completions", json=chat_body(image=False))
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "shutting_down"
        resp = await http.post(sc.url + "/v1/messages", json={"model": "m", "max_tokens": 1, "messages": []})
        assert resp.status == 503 and (await resp.json())["type"] == "error"
        assert sc.proc.returncode is None  # still draining: the held request is not done

        release.set()
        done = await inflight
        assert done.status == 200 and (await done.json())["object"] == "chat.completion"
        assert await asyncio.wait_for(sc.proc.wait(), 10) == 0
    assert any("shutdown requested" in line for line in sc.log)


async def test_sigterm_gives_up_on_requests_past_the_deadline(tmp_path: Path, held_upstream: Any) -> None:
    upstream_url, _release, arrived = held_upstream
    async with run_sidecar(tmp_path, upstream_url, shutdown_timeout_s=0.5) as sc, aiohttp.ClientSession() as http:
        inflight = asyncio.create_task(http.post(sc.url + "/v1/chat/completions", json=chat_body()))
        await asyncio.wait_for(arrived.wait(), 5)
        sc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(sc.proc.wait(), 10) == 0
        with contextlib.suppress(aiohttp.ClientError):
            resp = await inflight
            assert resp.status >= 500  # never a success that did not happen
    assert any("drain deadline passed" in line for line in sc.log)


async def test_kill_9_then_restart_cleans_the_stale_segment(tmp_path: Path, aiohttp_server: Any) -> None:
    from .test_offload import FakeEngine, chat_with_images

    engine = await aiohttp_server(FakeEngine().app())
    instance = f"kill9-{os.getpid()}"
    extra = {
        "upstream": {"mode": "offload"},
        "preprocess": {"processor": "llava-1.5", "workers": 1},
        "gate": {"max_bytes": "16MiB"},
        "shm": {"name": instance},
    }
    url = str(engine.make_url("")).rstrip("/")
    async with run_sidecar(tmp_path, url, extra) as first, aiohttp.ClientSession() as http:
        await _ready(http, first.url)
        resp = await http.post(first.url + "/v1/chat/completions", json=chat_with_images((40, 30)))
        assert resp.status == 200
        first.proc.kill()  # no chance to clean up
        await first.proc.wait()
    stale = Path("/dev/shm", f"mm-sidecar-{instance}-{first.proc.pid}")
    assert stale.exists()

    async with run_sidecar(tmp_path, url, extra) as second, aiohttp.ClientSession() as http:
        await _ready(http, second.url)
        assert not stale.exists()
        assert any("removed stale shared-memory segment" in line for line in second.log)
        resp = await http.post(second.url + "/v1/chat/completions", json=chat_with_images((40, 30)))
        assert resp.status == 200
        second.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.proc.wait(), 30) == 0
    assert not Path("/dev/shm", f"mm-sidecar-{instance}-{second.proc.pid}").exists()


async def _ready(http: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(60):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
