"""Admission in the running sidecar: exact processor costs, remote images fetched and inlined, body memory."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from aiohttp import web

from preprocess.cost import output_nbytes
from preprocess.extents import reservation_size
from preprocess.processors import read_spec, resolve_processor
from sidecar.app import create_app
from sidecar.app_keys import BODIES, POOL
from sidecar.echo import EchoEngine

from .conftest import FakeResolver, StackFactory, chat_body, data_url, image_bytes, make_config


class Parked:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: web.Request, body: dict[str, Any]) -> None:
        self.bodies.append(body)
        await self.release.wait()


async def test_gate_reserves_the_exact_processor_output(stack: StackFactory) -> None:
    parked = Parked()
    s = await stack(EchoEngine(before_first_chunk=parked), preprocess={"processor": "qwen2-vl"})
    body = chat_body()
    body["messages"][0]["content"] = [
        {"type": "image_url", "image_url": {"url": data_url(1920, 1080, "JPEG")}},
        {"type": "image_url", "image_url": {"url": data_url(37, 501)}},
    ]
    task = asyncio.create_task(s.client.post("/v1/chat/completions", json=body))
    async with asyncio.timeout(5):
        while not parked.bodies:
            await asyncio.sleep(0.005)
    spec = read_spec(resolve_processor("qwen2-vl"))
    expected = reservation_size(output_nbytes(spec, 1920, 1080)) + reservation_size(output_nbytes(spec, 37, 501))
    assert s.app[POOL].stats().reserved_bytes == expected
    assert expected > 50_000_000  # 1080p at the preset's max_pixels: ~50.6 MB of pixel_values
    parked.release.set()
    assert (await task).status == 200


async def test_a_request_priced_above_the_whole_budget_is_refused_at_once(stack: StackFactory) -> None:
    s = await stack(preprocess={"processor": "qwen2-vl"}, gate={"max_bytes": "8MiB"})
    resp = await s.client.post(
        "/v1/chat/completions",
        json=chat_body()
        | {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(1920, 1080, "JPEG")}}]}
            ]
        },
    )
    assert resp.status == 413
    message = (await resp.json())["error"]["message"]
    assert "gate.max_bytes=8388608" in message
    assert s.engine.stats.requests == 0


async def test_aspect_ratio_limit_names_the_part(stack: StackFactory) -> None:
    s = await stack(limits={"max_aspect_ratio": 50})
    body = chat_body()
    body["messages"][0]["content"][0]["image_url"]["url"] = data_url(1000, 10)
    resp = await s.client.post("/v1/chat/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "messages[0].content[0]"
    assert "limits.max_aspect_ratio=50" in error["message"]


class ImageHosts:
    """An allowed image host on 127.0.0.2 and a forbidden one on 127.0.0.1, both counting hits."""

    def __init__(self) -> None:
        self.hits = {"allowed": 0, "forbidden": 0}
        self.png = image_bytes(30, 20)

    def app(self, which: str) -> web.Application:
        async def serve(request: web.Request) -> web.Response:
            self.hits[which] += 1
            if request.path == "/redirect":
                raise web.HTTPFound(request.query["to"])
            return web.Response(body=self.png, content_type="image/png")

        app = web.Application()
        app.router.add_get("/{name:.*}", serve)
        return app


async def remote_stack(aiohttp_server: Any, aiohttp_client: Any) -> tuple[Any, EchoEngine, ImageHosts, int]:
    hosts = ImageHosts()
    allowed = await aiohttp_server(hosts.app("allowed"), host="127.0.0.2")
    # Same port on 127.0.0.1: anything that slipped past the address check would really land here.
    await aiohttp_server(hosts.app("forbidden"), port=allowed.port)
    engine = EchoEngine()
    upstream = await aiohttp_server(engine.app())
    config = make_config(
        str(upstream.make_url("")).rstrip("/"),
        limits={"allow_remote_urls": True, "allowed_networks": ["127.0.0.2/32"]},
    )
    resolver = FakeResolver({"images.test": [["127.0.0.2"]], "evil.test": [["127.0.0.1"]]})
    client = await aiohttp_client(create_app(config, resolver=resolver))
    return client, engine, hosts, allowed.port or 0


async def test_remote_images_are_fetched_checked_and_inlined(aiohttp_server: Any, aiohttp_client: Any) -> None:
    client, engine, hosts, port = await remote_stack(aiohttp_server, aiohttp_client)
    url = f"http://images.test:{port}/cat.png"
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}],
    }
    resp = await client.post("/v1/chat/completions", json=chat)
    assert resp.status == 200
    sent = engine.stats.bodies[-1]["messages"][0]["content"][0]["image_url"]
    assert sent == {"url": "data:image/png;base64," + base64.b64encode(hosts.png).decode(), "detail": "low"}

    anthropic = {
        "model": "m",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": url}}]}],
    }
    resp = await client.post("/v1/messages", json=anthropic)
    assert resp.status == 200
    source = engine.stats.bodies[-1]["messages"][0]["content"][0]["source"]
    assert source == {"type": "base64", "media_type": "image/png", "data": base64.b64encode(hosts.png).decode()}
    assert hosts.hits == {"allowed": 2, "forbidden": 0}
    assert client.app[BODIES].held == 0


async def test_remote_images_to_forbidden_addresses_never_connect(aiohttp_server: Any, aiohttp_client: Any) -> None:
    client, engine, hosts, port = await remote_stack(aiohttp_server, aiohttp_client)
    for url in (
        f"http://evil.test:{port}/x.png",  # a name that resolves to loopback
        f"http://127.0.0.1:{port}/x.png",  # a literal
        f"http://images.test:{port}/redirect?to=http://127.0.0.1:{port}/x.png",  # a redirect hop
    ):
        chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}]}
        resp = await client.post("/v1/chat/completions", json=chat)
        error = (await resp.json())["error"]
        assert resp.status == 400, error
        assert error["code"] == "fetch_failed" and error["param"] == "messages[0].content[0]"
        assert "forbidden" in error["message"]
    assert hosts.hits["forbidden"] == 0
    assert engine.stats.requests == 0
    assert client.app[POOL].stats().leases == 0 and client.app[BODIES].held == 0


async def test_body_memory_budget_refuses_with_503_and_is_given_back(stack: StackFactory) -> None:
    parked = Parked()
    s = await stack(EchoEngine(before_first_chunk=parked), server={"max_body_memory": "64KiB"})
    big = chat_body(image=False, text="x" * 20_000)
    first = asyncio.create_task(s.client.post("/v1/chat/completions", json=big))
    async with asyncio.timeout(5):
        while not parked.bodies:
            await asyncio.sleep(0.005)
    # A parsed body costs twice its size (the tree, then the bytes sent upstream).
    assert s.app[BODIES].held == 2 * len(json.dumps(big).encode())  # aiohttp json= is json.dumps
    resp = await s.client.post("/v1/chat/completions", json=big)
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert "server.max_body_memory=65536" in (await resp.json())["error"]["message"]
    parked.release.set()
    assert (await first).status == 200
    assert s.app[BODIES].held == 0
