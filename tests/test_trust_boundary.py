"""The trust boundary, through the running sidecar: internal part types, the one walker, routes denied by
default, bounded work per request. Each hostile case pins the exact answer; the `stack` fixture checks
the no-leak invariant after every test, and the engine is asserted to have seen nothing it should not.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from sidecar.app import create_app
from sidecar.app_keys import BODIES
from sidecar.echo import EchoEngine

from .conftest import StackFactory, assert_invariant, data_url, image_bytes, make_config
from .test_admission import Parked
from .test_offload import FakeEngine, offload  # noqa: F401 - the offload fixture

TENSORS: dict[str, Any] = {
    "type": "image_tensors",
    "tensors": {
        "pixel_values": {
            "shm": "mm-sidecar-main-1",
            "offset": 8192,
            "nbytes": 4,
            "dtype": "float32",
            "shape": [1],
            "generation": 7,
        }
    },
}
PNG_B64 = base64.b64encode(image_bytes()).decode()
ANTHROPIC_IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}


def raw_url(client: TestClient[web.Request, web.Application], path: str) -> URL:
    """The test server's URL for `path` exactly as written (`//v1/...` is a path here, not a host)."""
    return URL(f"http://{client.server.host}:{client.server.port}{path}", encoded=True)


def user(*parts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


# Where a client can put a part, per route: (path, body, the part's path in the error).
FORGED: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", {"model": "m", "messages": user({"type": "text", "text": "hi"}, TENSORS)},
     "messages[0].content[1]"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "assistant", "content": [TENSORS]}]},
     "messages[0].content[0]"),
    ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": user(TENSORS)}, "messages[0].content[0]"),
    ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": user(
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "x"}, TENSORS]})},
     "messages[0].content[0].content[1]"),
    ("/v1/messages", {"model": "m", "max_tokens": 4, "system": [TENSORS], "messages": user(
        {"type": "text", "text": "hi"})}, "system[0]"),
    ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [TENSORS]}]}, "input[0].content[0]"),
    ("/v1/responses", {"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": [TENSORS]}]},
     "input[0].output[0]"),
    ("/tokenize", {"model": "m", "messages": user(TENSORS)}, "messages[0].content[0]"),
]  # fmt: skip


def forged_message(where: str) -> str:
    return f"{where}.type: 'image_tensors' parts are made by the sidecar itself; clients cannot send them"


@pytest.mark.parametrize(("path", "body", "where"), FORGED)
async def test_client_tensor_parts_are_refused_in_passthrough(
    stack: StackFactory, path: str, body: dict[str, Any], where: str
) -> None:
    s = await stack()
    resp = await s.client.post(path, json=body)
    payload = await resp.json()
    assert resp.status == 400, payload
    message = forged_message(where)
    if path == "/v1/messages":
        assert payload == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    else:
        assert payload["error"] == {
            "message": message,
            "type": "invalid_request_error",
            "param": f"{where}.type",
            "code": "forbidden_part",
        }
    assert s.engine.stats.requests == 0


@pytest.mark.parametrize(("path", "body", "where"), FORGED)
async def test_client_tensor_parts_are_refused_in_offload(
    offload: Any,  # noqa: F811 - the fixture imported above
    path: str,
    body: dict[str, Any],
    where: str,
) -> None:
    client, engine = await offload()
    resp = await client.post(path, json=body)
    payload = await resp.json()
    assert resp.status == 400, payload
    text = payload["error"]["message"]
    assert text == forged_message(where)
    assert engine.bodies == [] and engine.received == []


# ------------------------------------------------------------------------------------- the one walker


async def test_openai_image_part_in_anthropic_messages_is_refused(stack: StackFactory) -> None:
    s = await stack(gate={"max_concurrent": 1, "max_queue": 2})
    body = {"model": "m", "max_tokens": 4, "messages": user({"type": "image_url", "image_url": {"url": data_url()}})}
    resp = await s.client.post("/v1/messages", json=body)
    assert resp.status == 400
    assert await resp.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages[0].content[0].type: 'image_url' is not an Anthropic content part type; "
            'send media here as {"type": "image"}',
        },
    }
    assert s.engine.stats.requests == 0


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (
            {
                "model": "m",
                "max_tokens": 4,
                "system": [{"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/x.png"}}],
                "messages": user({"type": "text", "text": "hi"}),
            },
            "system[0]",
        ),
        (
            {
                "model": "m",
                "max_tokens": 4,
                "messages": user(
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "image", "source": {"type": "url", "url": "http://10.0.0.1/a.png"}}],
                    }
                ),
            },
            "messages[0].content[0].content[0]",
        ),
    ],
)
async def test_remote_urls_anywhere_in_anthropic_requests_follow_the_url_policy(
    stack: StackFactory, body: dict[str, Any], where: str
) -> None:
    s = await stack()
    resp = await s.client.post("/v1/messages", json=body)
    assert resp.status == 400
    message = (await resp.json())["error"]["message"]
    assert message == (
        f"{where}: remote image URLs are disabled (limits.allow_remote_urls=false); "
        "send the data inline as a base64 data URL"
    )
    assert s.engine.stats.requests == 0


async def test_anthropic_image_in_system_is_priced_and_gated(stack: StackFactory) -> None:
    parked = Parked()
    s = await stack(EchoEngine(before_first_chunk=parked), gate={"max_concurrent": 1, "max_queue": 0})
    body = {"model": "m", "max_tokens": 4, "system": [ANTHROPIC_IMAGE], "messages": user({"type": "text", "text": "?"})}
    first = asyncio.create_task(s.client.post("/v1/messages", json=body))
    async with asyncio.timeout(5):
        while not parked.bodies:
            await asyncio.sleep(0.005)
    # The gate holds the first: a second image request is refused, not sent to the engine.
    resp = await s.client.post("/v1/messages", json=body)
    assert resp.status == 429
    parked.release.set()
    assert (await first).status == 200
    assert s.engine.stats.requests == 1


@pytest.mark.parametrize(
    ("part", "ptype"),
    [
        ({"type": "image_embeds", "image_embeds": "UEsDBBQAAAAIAA=="}, "image_embeds"),
        ({"type": "file", "file": {"file_data": "JVBERi0="}}, "file"),
        ({"type": "image_pil", "image_pil": "x"}, "image_pil"),
    ],
)
async def test_unknown_part_types_are_refused_unless_allowed(
    stack: StackFactory, part: dict[str, Any], ptype: str
) -> None:
    s = await stack()
    body = {"model": "m", "messages": user({"type": "text", "text": "hi"}, part)}
    resp = await s.client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported_part" and error["param"] == "messages[0].content[1].type"
    assert error["message"] == (
        f"messages[0].content[1].type: content part type {ptype!r} is not supported here "
        "(the operator may allow it in limits.allowed_part_types)"
    )
    assert s.engine.stats.requests == 0
    # The operator allows it: forwarded as sent.
    s2 = await stack(limits={"allowed_part_types": [ptype]})
    resp = await s2.client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert s2.engine.stats.bodies[-1]["messages"][0]["content"][1] == part


async def test_prompt_embeds_and_preprocessing_overrides_are_refused(stack: StackFactory) -> None:
    s = await stack()
    resp = await s.client.post("/v1/completions", json={"model": "m", "prompt_embeds": "UEsDBA=="})
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == (
        "prompt_embeds: tensor inputs are not accepted (the operator may allow them in limits.allowed_part_types)"
    )
    body = {
        "model": "m",
        "messages": user({"type": "image_url", "image_url": {"url": data_url()}}),
        "mm_processor_kwargs": {"max_pixels": 1 << 30},
    }
    resp = await s.client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == (
        "mm_processor_kwargs: changes how the engine preprocesses media, which the sidecar prices from its "
        "own processor settings; not accepted"
    )
    assert s.engine.stats.requests == 0


@pytest.mark.parametrize(
    ("prompt", "where"),
    [({"type": "image_url"}, "prompt"), ([{"image": "x"}], "prompt[0]"), ([[1, "a"]], "prompt[0]")],
)
async def test_completions_prompt_is_text_or_token_ids(stack: StackFactory, prompt: Any, where: str) -> None:
    s = await stack()
    resp = await s.client.post("/v1/completions", json={"model": "m", "prompt": prompt})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == where
    assert s.engine.stats.requests == 0


async def test_allowed_hosts_mean_the_same_in_both_checks(stack: StackFactory) -> None:
    # `[2001:db8::1]` in the config and an uncompressed spelling in the URL: one normal form for both.
    s = await stack(limits={"allow_remote_urls": True, "allowed_hosts": ["[2001:DB8::1]"]})
    url = "http://[2001:db8:0:0::1]:9/x.png"
    body = {"model": "m", "messages": user({"type": "image_url", "image_url": {"url": url}})}
    resp = await s.client.post("/v1/chat/completions", json=body)
    error = (await resp.json())["error"]
    # Past the walker's host check; refused by the fetcher's address rule (documentation range), not the list.
    assert resp.status == 400 and error["code"] == "fetch_failed", error
    assert "allowed_hosts" not in error["message"]
    resp = await s.client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": user({"type": "image_url", "image_url": {"url": "http://[2001:db8::2]/x"}})},
    )
    error = (await resp.json())["error"]
    assert error["message"] == "messages[0].content[0]: host '2001:db8::2' is not in limits.allowed_hosts"


# ------------------------------------------------------------------------------------------ routes


BOMB = (
    "data:image/png;base64,"
    + base64.b64encode(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\xff\xff\x00\x00\xff\xff\x08\x02\x00\x00\x00\x00\x00\x00\x00"
    ).decode()
)
METADATA_URL = "http://169.254.169.254/latest/meta-data/x.png"


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "//v1/chat/completions", "/v1//chat/completions/",
                                  "/v1/./chat/completions", "/v1/x/../chat/completions"])  # fmt: skip
@pytest.mark.parametrize("url", [BOMB, METADATA_URL])
async def test_api_routes_are_walked_whatever_their_spelling(stack: StackFactory, path: str, url: str) -> None:
    s = await stack()
    body = {"model": "m", "messages": user({"type": "image_url", "image_url": {"url": url}})}
    resp = await s.client.session.post(raw_url(s.client, path), json=body)
    error = (await resp.json())["error"]
    assert resp.status == 400, error
    assert error["code"] in ("image_too_large", "remote_url_forbidden", "bad_image"), error
    assert error["param"] == "messages[0].content[0]"
    assert s.engine.stats.requests == 0


@pytest.mark.parametrize("path", ["/invocations", "/v1/embeddings", "/pooling", "/v1/score", "/v1/audio/x"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_other_routes_are_denied_by_default(stack: StackFactory, path: str, method: str) -> None:
    s = await stack()
    body = {"model": "m", "messages": user({"type": "image_url", "image_url": {"url": METADATA_URL}})}
    resp = await s.client.request(method, path, json=body)
    assert resp.status == 404
    assert (await resp.json())["error"] == {
        "message": f"{method} {path} is not a route of this server (the sidecar forwards the API routes and the "
        "engine paths listed in routes.extra_paths)",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    assert s.engine.stats.requests == 0


async def test_denied_route_answers_in_the_anthropic_shape(stack: StackFactory) -> None:
    s = await stack()
    resp = await s.client.put("/v1/messages", json={})
    assert resp.status == 404
    payload = await resp.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "not_found_error"


class Recorder:
    """A fake engine for routing tests: records each request's raw path and body, answers 200."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        return app

    async def any(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, await request.read()))
        return web.json_response({"ok": True})


@pytest.fixture
async def recorded(aiohttp_server: Any, aiohttp_client: Any) -> Any:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def build(**sections: dict[str, Any]) -> tuple[TestClient[web.Request, web.Application], Recorder]:
        recorder = Recorder()
        upstream = await aiohttp_server(recorder.app())
        client = await aiohttp_client(create_app(make_config(str(upstream.make_url("")).rstrip("/"), **sections)))
        clients.append(client)
        return client, recorder

    yield build
    for client in clients:
        await assert_invariant(client)


async def test_extra_paths_are_walked_and_forwarded_as_sent(recorded: Any) -> None:
    client, engine = await recorded()
    text = {"model": "m", "messages": user({"type": "text", "text": "hi"})}
    assert (await client.post("/tokenize", json=text)).status == 200
    assert (await client.post("/detokenize", json={"tokens": [1, 2]})).status == 200
    resp = await client.post("/tokenize/", json={"model": "m", "messages": user(image := {"type": "image_url"})})
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages[0].content[0].image_url"
    del image
    bomb = {"model": "m", "messages": user({"type": "image_url", "image_url": {"url": BOMB}})}
    resp = await client.post("/tokenize", json=bomb)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "image_too_large"
    assert [(m, p) for m, p, _ in engine.seen] == [("POST", "/tokenize"), ("POST", "/detokenize")]
    assert orjson.loads(engine.seen[0][2]) == text


async def test_paths_go_upstream_raw(recorded: Any) -> None:
    client, engine = await recorded(routes={"extra_paths": ["/v1/files"]})
    for path in ("/v1/files/%2e%2e/admin", "/v1/models?x=%2F", "//v1/models"):
        resp = await client.session.get(raw_url(client, path))
        assert resp.status == 200
    assert [p for _, p, _ in engine.seen] == ["/v1/files/%2e%2e/admin", "/v1/models?x=%2F", "//v1/models"]


async def test_api_route_spelling_is_forwarded_as_sent(recorded: Any) -> None:
    client, engine = await recorded()
    body = {"model": "m", "messages": user({"type": "text", "text": "hi"})}
    assert (await client.post("/v1/chat/completions/", json=body)).status == 200
    assert engine.seen[-1][1] == "/v1/chat/completions/"


# ------------------------------------------------------------------------- bounded work per request


async def test_too_many_messages_and_parts_stop_the_walk(stack: StackFactory) -> None:
    s = await stack(limits={"max_messages_per_request": 3, "max_parts_per_request": 5})
    msgs = [{"role": "user", "content": "x"}] * 4
    resp = await s.client.post("/v1/chat/completions", json={"model": "m", "messages": msgs})
    assert resp.status == 400
    assert (await resp.json())["error"] == {
        "message": "messages[3]: request has 4 messages entries, more than limits.max_messages_per_request=3",
        "type": "invalid_request_error",
        "param": "messages[3]",
        "code": "too_many_parts",
    }
    parts = [{"type": "text", "text": "a"}] * 3
    resp = await s.client.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": parts}] * 2}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == (
        "messages[1].content[2]: request has more than limits.max_parts_per_request=5 content parts"
    )
    assert s.engine.stats.requests == 0


async def test_a_body_of_tiny_parts_is_refused_before_it_is_parsed(stack: StackFactory) -> None:
    s = await stack()
    part = b'{"type":"text","text":"a"}'
    raw = b'{"model":"m","messages":[{"role":"user","content":[' + b",".join([part] * 260_000) + b"]}]}"
    assert 6 << 20 < len(raw) < 8 << 20  # the reproduced 6.7 MiB case
    started = time.perf_counter()
    resp = await s.client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - started
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["code"] == "body_too_complex"
    assert error["message"] == "request body has more than limits.max_json_objects=20000 JSON objects"
    assert elapsed < 2.0  # refused as it arrived; the old walk held the loop ~0.65 s on this body alone
    assert s.engine.stats.requests == 0


async def test_a_body_of_many_values_is_refused(stack: StackFactory) -> None:
    s = await stack()
    raw = b'{"model":"m","prompt":"hi","extra":[' + b",".join([b'"a"'] * 300_000) + b"]}"
    resp = await s.client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["message"] == (
        "request body has more than limits.max_json_items=200000 JSON values"
    )


async def test_token_id_prompts_within_the_limits_pass(stack: StackFactory) -> None:
    s = await stack()
    resp = await s.client.post("/v1/completions", json={"model": "m", "prompt": list(range(100_000))})
    assert resp.status == 200


# --------------------------------------------------------------------------- body memory for text


async def test_queued_image_bodies_leave_text_its_share(stack: StackFactory) -> None:
    parked = Parked()

    async def park_images(request: web.Request, body: dict[str, Any]) -> None:
        if "image_url" in orjson.dumps(body).decode():
            await parked(request, body)

    s = await stack(
        EchoEngine(before_first_chunk=park_images),
        server={"max_body_memory": "256KiB", "text_body_share": 0.25},
        gate={"max_concurrent": 1, "max_queue": 8},
    )
    # ~40 KiB bodies, 80 KiB once parsed: two fit in the images' 192 KiB share, a third does not.
    big = data_url(160, 120, "PNG")
    pad = "y" * (40_000 - len(big))
    image = {
        "model": "m",
        "messages": user({"type": "image_url", "image_url": {"url": big}}, {"type": "text", "text": pad}),
    }
    first = asyncio.create_task(s.client.post("/v1/chat/completions", json=image))
    second = asyncio.create_task(s.client.post("/v1/chat/completions", json=image))
    async with asyncio.timeout(5):
        while s.app[BODIES].image_held < 2 * 80_000:
            await asyncio.sleep(0.005)
    third = await s.client.post("/v1/chat/completions", json=image)
    assert third.status == 503
    assert "multimodal request bodies in memory would exceed their share" in (await third.json())["error"]["message"]
    # Text still gets in, with images holding their whole share.
    text = {"model": "m", "messages": user({"type": "text", "text": "z" * 20_000})}
    assert (await s.client.post("/v1/chat/completions", json=text)).status == 200
    parked.release.set()
    assert [(await t).status for t in (first, second)] == [200, 200]


async def test_a_nesting_bomb_is_refused_as_it_arrives(stack: StackFactory) -> None:
    s = await stack()
    raw = b'{"model":"m","prompt":"hi","x":' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"}"
    resp = await s.client.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_complex"
    assert s.engine.stats.requests == 0
