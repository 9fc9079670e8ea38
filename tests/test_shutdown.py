"""SIGTERM on a real `mm-sidecar serve` process: readiness drops, new requests get 503, in-flight ones finish."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from sidecar.app import drain
from sidecar.app_keys import POOL
from sidecar.echo import EchoEngine

from .conftest import StackFactory, chat_body, free_port, messages_body
from .test_proxy import Holder, wait_for

SHUTTING_DOWN = "the sidecar is shutting down; retry on another replica"
OPENAI_SHUTTING_DOWN = {
    "error": {"message": SHUTTING_DOWN, "type": "service_unavailable", "param": None, "code": "shutting_down"}
}
ANTHROPIC_SHUTTING_DOWN = {"type": "error", "error": {"type": "overloaded_error", "message": SHUTTING_DOWN}}


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


async def test_drain_answers_queued_requests_at_once_and_lets_leased_ones_finish(stack: StackFactory) -> None:
    holder = Holder()
    s = await stack(EchoEngine(before_first_chunk=holder), gate={"max_concurrent": 1, "queue_timeout_s": 30})
    leased = asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body(stream=True)))
    await holder.wait_arrived(1)
    queued = [
        asyncio.create_task(s.client.post("/v1/chat/completions", json=chat_body(), headers={"x-request-id": "q-1"})),
        asyncio.create_task(s.client.post("/v1/messages", json=messages_body(stream=True))),
        asyncio.create_task(s.client.post("/v1/responses", json={"model": "echo", "input": _responses_image()})),
    ]
    await wait_for(lambda: s.app[POOL].stats().queued == 3)

    draining = asyncio.create_task(drain(s.app, 5))
    async with asyncio.timeout(1):  # at once: not at the queue timeout (30 s), nor at the drain deadline
        answers = [await task for task in queued]
    for resp, expected in zip(
        answers, (OPENAI_SHUTTING_DOWN, ANTHROPIC_SHUTTING_DOWN, OPENAI_SHUTTING_DOWN), strict=True
    ):
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1" and resp.headers["retry-after-ms"] == "1000"
        assert resp.headers["Content-Type"] == "application/json"
        assert await resp.json() == expected
    assert answers[0].headers["x-request-id"] == "q-1"
    assert holder.arrived == 1  # none of them reached the engine

    # The leased request keeps its deadline: drain waits for it, and it completes.
    assert not draining.done() and s.app[POOL].stats().leases == 1
    holder.gate.set()
    resp = await leased
    assert resp.status == 200 and (await resp.read()).rstrip().endswith(b"data: [DONE]")
    assert await asyncio.wait_for(draining, 5) is True


def _responses_image() -> list[dict[str, Any]]:
    url = chat_body()["messages"][0]["content"][0]["image_url"]["url"]
    return [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}, {"type": "input_image", "image_url": url}]}
    ]


async def test_sigterm_answers_queued_requests_at_once(tmp_path: Path, held_upstream: Any) -> None:
    upstream_url, release, arrived = held_upstream
    async with (
        run_sidecar(
            tmp_path, upstream_url, {"gate": {"queue_timeout_s": 30}}, shutdown_timeout_s=10, debug_endpoints=True
        ) as sc,
        aiohttp.ClientSession() as http,
    ):
        inflight = asyncio.create_task(http.post(sc.url + "/v1/chat/completions", json=chat_body()))
        await asyncio.wait_for(arrived.wait(), 5)
        queued = [
            asyncio.create_task(http.post(sc.url + "/v1/chat/completions", json=chat_body(stream=True))),
            asyncio.create_task(http.post(sc.url + "/v1/messages", json=messages_body())),
        ]
        async with asyncio.timeout(5):
            while (await (await http.get(sc.url + "/debug/state")).json())["queued"] != 2:
                await asyncio.sleep(0.02)

        sc.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(2):
            openai_resp, anthropic_resp = [await task for task in queued]
        for resp, expected in ((openai_resp, OPENAI_SHUTTING_DOWN), (anthropic_resp, ANTHROPIC_SHUTTING_DOWN)):
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1" and resp.headers["retry-after-ms"] == "1000"
            assert await resp.json() == expected
        assert sc.proc.returncode is None and not inflight.done()  # the leased request still has its deadline

        release.set()
        done = await asyncio.wait_for(inflight, 5)
        assert done.status == 200 and (await done.json())["object"] == "chat.completion"
        assert await asyncio.wait_for(sc.proc.wait(), 10) == 0
    assert any("2 queued for a slot: refused" in line for line in sc.log)
