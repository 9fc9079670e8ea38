"""Shared fixtures: a real echo upstream on loopback, sidecar apps built from real configs, images.

Fakes live here (STYLE.md 14). The upstream is the built-in `EchoEngine` on a real aiohttp server;
`before_first_chunk` hooks let a test hold, fail or stall a request at the engine's ack point.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from bench.services import free_port
from sidecar.app import create_app
from sidecar.app_keys import POOL
from sidecar.config import Config, from_mapping
from sidecar.echo import EchoEngine


def image_bytes(
    width: int = 64, height: int = 48, fmt: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, fmt)
    return buf.getvalue()


def data_url(width: int = 64, height: int = 48, fmt: str = "PNG") -> str:
    mime = "image/jpeg" if fmt == "JPEG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64," + base64.b64encode(image_bytes(width, height, fmt)).decode()


def chat_body(*, image: bool = True, stream: bool = False, text: str = "describe", **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url()}})
    return {"model": "echo", "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


def messages_body(*, image: bool = True, stream: bool = False) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "describe"}]
    if image:
        b64 = base64.b64encode(image_bytes()).decode()
        content.insert(0, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}})
    return {"model": "echo", "max_tokens": 16, "messages": [{"role": "user", "content": content}], "stream": stream}


def make_config(upstream_url: str, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "server": {"port": 0, "shutdown_timeout_s": 5, "debug_endpoints": True},
        "upstream": {"url": upstream_url, "connect_timeout_s": 2, "ack_timeout_s": 10},
        "gate": {"max_concurrent": 2, "max_queue": 64, "queue_timeout_s": 10, "retry_after_s": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_mapping(raw)


@dataclass
class Stack:
    """A sidecar app in front of an echo upstream, both on loopback."""

    engine: EchoEngine
    upstream: TestServer
    client: TestClient[web.Request, web.Application]

    @property
    def app(self) -> web.Application:
        return self.client.app  # type: ignore[return-value]

    def pool_is_idle(self) -> bool:
        stats = self.app[POOL].stats()
        return stats.leases == 0 and stats.reserved_bytes == 0 and stats.queued == 0


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def stack(aiohttp_client: Any, aiohttp_server: Any) -> AsyncIterator[StackFactory]:
    built: list[Stack] = []

    async def build(engine: EchoEngine | None = None, **sections: dict[str, Any]) -> Stack:
        engine = engine or EchoEngine()
        upstream = await aiohttp_server(engine.app())
        config = make_config(str(upstream.make_url("")).rstrip("/"), **sections)
        client = await aiohttp_client(create_app(config))
        built.append(Stack(engine, upstream, client))
        return built[-1]

    yield build
    for s in built:
        await assert_invariant(s.client)


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


async def assert_invariant(
    target: TestClient[web.Request, web.Application] | TestServer, settle_s: float = 5.0
) -> None:
    """The no-leak invariant, checked after every test that built a sidecar: once its requests are
    over, no lease, reserved byte, queued waiter, in-flight request or held body remains; in offload
    mode the arena is fully free, every worker is alive (not a zombie) and the only segment of this
    sidecar's instance in /dev/shm is its own."""
    state: dict[str, Any] = {}
    async with asyncio.timeout(settle_s + 5), aiohttp.ClientSession() as http:
        for _ in range(int(settle_s / 0.02)):
            async with http.get(target.make_url("/debug/state")) as resp:
                assert resp.status == 200
                state = await resp.json()
            busy = state["leases"] or state["queued"] or state["inflight"] or state["body_bytes"]
            if not busy and not state.get("arena", {}).get("extents"):
                break
            await asyncio.sleep(0.02)
    assert (state["leases"], state["reserved_bytes"], state["queued"]) == (0, 0, 0), state
    assert (state["inflight"], state["body_bytes"]) == (0, 0), state
    if "arena" in state:
        arena, workers = state["arena"], state["workers"]
        assert arena["extents"] == 0 and arena["free_bytes"] == arena["capacity"], arena
        assert workers["alive"] == len(workers["pids"]) and workers["pids"], workers
        assert not any(_zombie_or_gone(pid) for pid in workers["pids"]), workers
        instance = arena["name"].rsplit("-", 1)[0] + "-"
        mine = [n for n in os.listdir("/dev/shm") if n.startswith(instance)]
        assert mine == [arena["name"]], mine


class FakeResolver(AbstractResolver):
    """Answers from a table: name -> one answer per call (the last one repeats)."""

    def __init__(self, table: dict[str, Sequence[Sequence[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = self.table.get(host)
        n = self.calls.count(host)
        self.calls.append(host)
        if answers is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            ResolveResult(
                hostname=host,
                host=addr,
                port=port,
                family=socket.AF_INET6 if ":" in addr else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for addr in answers[min(n, len(answers) - 1)]
        ]

    async def close(self) -> None:
        pass


@contextlib.contextmanager
def engine_process(args: Sequence[str], log_path: Path, timeout_s: float = 120) -> Iterator[str]:
    """`mm-sidecar engine ARGS --port P` as a process (one thread, CPU), healthy on entry: its URL.

    Stopped with SIGTERM (SIGKILL after 30 s) on exit; its output goes to `log_path`, whose tail a
    failed start reports."""
    port = free_port()
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mm_sidecar.cli", "engine", *args, "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    json.load(resp)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise AssertionError(f"engine did not start (exit {proc.poll()}):\n{tail}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Real vLLM (`make vllm-env`) on the tiny model, one instance for the whole test run, started by the
    first test that asks for it. Its processor cache is off, so every request is preprocessed afresh."""
    from bench.services import vllm
    from engine.tiny import TINY_MODEL_NAME, ensure_tiny_model

    model = ensure_tiny_model(tmp_path_factory.mktemp("models") / TINY_MODEL_NAME)
    with vllm(model, tmp_path_factory.mktemp("vllm-logs")) as service:
        yield service


_VOLATILE = frozenset(("id", "created", "created_at"))  # differ between any two requests


def normalised(value: Any) -> Any:
    """`value` with ids and creation times blanked at any depth (output item ids included): the
    differences README documents between an engine's answer and the same answer through the sidecar."""
    if isinstance(value, dict):
        return {k: "<volatile>" if k in _VOLATILE else normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    return value


async def vllm_metrics(url: str) -> dict[str, float]:
    """vLLM's Prometheus gauges and counters, summed over labels (name -> value), plus the finished
    requests by reason (`vllm:request_success_total:abort`, ...)."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(vllm:[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            values[match[1]] = values.get(match[1], 0.0) + float(match[3])
            reason = re.search(r'finished_reason="([a-z]+)"', match[2] or "")
            if reason:
                values[f"{match[1]}:{reason[1]}"] = float(match[3])
    return values
