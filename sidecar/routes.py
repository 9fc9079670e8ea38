"""HTTP handlers: the four API routes, pass-through for everything else, and the local endpoints.

An API request goes: read the body (size-capped) -> parse -> classify. Text goes straight to the
engine. Multimodal waits for a lease from the slot pool, then goes to the engine; the lease is
released at the engine's ack (see `upstream.py`) or on whatever else ends the request.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .app_keys import BODIES, CONFIG, METRICS, PIPELINE, POOL, REMOTE, SPEC, STATE, UPSTREAM
from .assemble import Kind, can_upgrade, upgrade_request
from .bodies import read_body
from .classify import Classification, classify
from .errors import Cause, SidecarError
from .families import Family, Route, error_response, family_of_path
from .gate import Lease
from .offload import CHAT_PATH, check_offloadable, preprocess_images, to_chat
from .upstream import Forward, request_headers

KIND = web.RequestKey("mm_kind", str)  # "text" | "multimodal", once classified
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(request: web.Request) -> str:
    """Keep a sane client `x-request-id` (for tracing across the hop), else make one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else os.urandom(16).hex()  # uuid4's randomness, a tenth of its cost


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SidecarError(Cause.BAD_JSON, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SidecarError(Cause.BAD_JSON, "request body must be a JSON object")
    return data


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (429, 529):
        return "rejected"
    return "client_error" if status < 500 else "error"


class ApiHandler:
    """POST handler for one API route (chat, completions, responses, messages)."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def handle(self, request: web.Request) -> web.StreamResponse:
        app = request.app
        config, metrics = app[CONFIG], app[METRICS]
        request_id = request_id_of(request)
        started = time.monotonic()
        outcome = "cancelled"  # overwritten unless the client goes away first
        charged = [0]  # body bytes held against server.max_body_memory, given back at the end
        try:
            response = await self._handle(request, request_id, charged)
            outcome = _outcome(response.status)
            return response
        except SidecarError as error:
            outcome = _outcome(error.status)
            metrics.rejections.labels(error.cause.code).inc()
            return error_response(
                self.route.family,
                error,
                request_id=request_id,
                retry_after_s=config.gate.retry_after_s,
                anthropic_overload_status=config.gate.anthropic_overload_status,
            )
        finally:
            app[BODIES].give(charged[0])
            kind = request.get(KIND, "text")
            metrics.request_done(self.route.family, kind, outcome, time.monotonic() - started)

    async def _handle(self, request: web.Request, request_id: str, charged: list[int]) -> web.StreamResponse:
        app = request.app
        config = app[CONFIG]
        body, charged[0] = await read_body(
            request, app[BODIES], config.server.max_body_bytes, config.server.body_timeout_s
        )
        data = parse_json(body)
        spec = app.get(SPEC)
        found = classify(self.route.kind, data, config.limits, config.gate, spec)
        request[KIND] = found.kind
        headers = request_headers(request.headers, request_id)
        if REMOTE in app and found.multimodal:
            added = await app[REMOTE].inline(found.parts, config.limits, spec, app[BODIES])
            charged[0] += added
            if added:
                body = orjson.dumps(data)
        if config.upstream.mode == "offload":
            return await self._offload(request, request_id, headers, data, found)
        if not found.multimodal:
            fwd = Forward(request.method, request.path_qs, headers, body, self.route.family, request_id)
            return await app[UPSTREAM].forward(request, fwd)

        assemble: Kind | None = None
        if config.upstream.stream_upgrade and can_upgrade(self.route.kind, data):
            data, assemble = upgrade_request(self.route.kind, data), self.route.kind
            body = orjson.dumps(data)
        lease = await self._admit(app, found.cost)
        with lease:
            fwd = Forward(
                request.method, request.path_qs, headers, body, self.route.family, request_id, lease, assemble
            )
            return await app[UPSTREAM].forward(request, fwd)

    async def _admit(self, app: web.Application, nbytes: int, sizes: tuple[int, ...] = ()) -> Lease:
        metrics = app[METRICS]
        queued_at = time.monotonic()
        try:
            return await app[POOL].acquire(nbytes, sizes)
        finally:
            metrics.queue_wait.observe(time.monotonic() - queued_at)

    async def _offload(
        self,
        request: web.Request,
        request_id: str,
        headers: CIMultiDict[str],
        data: dict[str, Any],
        found: Classification,
    ) -> web.StreamResponse:
        """Offload mode: preprocess here, send tensor descriptors, release at the engine's headers."""
        app = request.app
        if not app[STATE].engine_verified:
            raise SidecarError(
                Cause.UPSTREAM_UNAVAILABLE, "the engine has not been verified to share this /dev/shm yet; retry"
            )
        if not found.multimodal:
            chat, transform = to_chat(self.route, data)
            fwd = Forward(
                "POST", CHAT_PATH, headers, orjson.dumps(chat), self.route.family, request_id, transform=transform
            )
            return await app[UPSTREAM].forward(request, fwd)
        check_offloadable(found)
        spec, metrics = app[SPEC], app[METRICS]
        sizes = tuple(part.cost for part in found.parts)
        lease = await self._admit(app, sum(sizes), sizes)
        with lease:  # on any ending, the extents go back once no worker writes them
            for part in found.parts:
                metrics.media_parts.labels(part.media).inc()
            assert isinstance(lease.memory, list)  # the pipeline's extents, one per image
            await preprocess_images(app[PIPELINE], lease.memory, found.parts, spec, metrics)
            chat, transform = to_chat(self.route, data)
            fwd = Forward(
                "POST",
                CHAT_PATH,
                headers,
                orjson.dumps(chat),
                self.route.family,
                request_id,
                lease,
                ack="headers",
                transform=transform,
            )
            return await app[UPSTREAM].forward(request, fwd)


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other path (and GET /v1/models): forwarded unchanged, never gated."""
    request_id = request_id_of(request)
    family: Family = family_of_path(request.path)
    try:
        server = request.app[CONFIG].server
        body, charged = await read_body(request, request.app[BODIES], server.max_body_bytes, server.body_timeout_s)
    except SidecarError as error:
        return error_response(family, error, request_id=request_id)
    try:
        headers = request_headers(request.headers, request_id)
        fwd = Forward(request.method, request.path_qs, headers, body, family, request_id)
        return await request.app[UPSTREAM].forward(request, fwd)
    except SidecarError as error:
        return error_response(family, error, request_id=request_id)
    finally:
        request.app[BODIES].give(charged)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    if request.app[CONFIG].upstream.mode == "offload" and not request.app[STATE].engine_verified:
        return web.json_response({"status": "engine not verified (shared memory)"}, status=503)
    if not await request.app[UPSTREAM].healthy():
        return web.json_response({"status": "upstream unreachable"}, status=503)
    return web.json_response({"status": "ready"})


async def debug_state(request: web.Request) -> web.Response:
    """Everything a test needs to check that nothing leaked (server.debug_endpoints only)."""
    app = request.app
    pool = app[POOL].stats()
    state: dict[str, Any] = {
        "leases": pool.leases,
        "reserved_bytes": pool.reserved_bytes,
        "queued": pool.queued,
        "inflight": app[STATE].inflight,
        "body_bytes": app[BODIES].held,
    }
    if PIPELINE in app:
        pipeline = app[PIPELINE]
        arena, workers = pipeline.stats()
        state["arena"] = {
            "name": pipeline.arena.name if pipeline.arena else None,
            "extents": arena.extents,
            "free_bytes": arena.free_bytes,
            "capacity": arena.capacity,
        }
        state["workers"] = {
            "alive": workers.workers,
            "busy": workers.busy,
            "queued": workers.queued,
            "restarts": workers.restarts,
            "pids": pipeline.pool.pids() if pipeline.pool else [],
        }
    return web.json_response(state)
