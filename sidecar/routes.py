"""HTTP handlers: the four API routes, the engine's extra paths, safe methods passed through, the local endpoints.

An API request goes: read the body (size- and structure-capped) -> parse -> walk (`classify.py`). Text
goes straight to the engine. Multimodal waits for a lease from the slot pool, then goes to the engine;
the lease is released at the engine's ack (see `upstream.py`) or on whatever else ends the request.
What goes upstream is serialized from the walked tree, so the engine reads exactly what was checked.

Routes are denied by default (`Dispatcher`): POST/PUT/PATCH/DELETE reach the engine only on the API
routes and `routes.extra_paths`, matched on the normalised path; the path goes upstream as sent.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from preprocess.processors import ProcessorSpec

from .app_keys import BODIES, CONFIG, HOLLOWER, METRICS, PIPELINE, POOL, REMOTE, SPEC, STATE, UPSTREAM
from .assemble import Kind, can_upgrade, upgrade_request
from .bodies import BodyCharge, JsonBounds, read_body
from .classify import Classification, classify, price_deep_headers
from .config import Config
from .errors import Cause, SidecarError
from .families import ROUTES, Family, Route, error_response, family_of_path
from .gate import Lease
from .hollow import Parsed, Texts, parse_body
from .offload import CHAT_PATH, check_offloadable, preprocess_images, to_chat
from .upstream import Forward, request_headers

KIND = web.RequestKey("mm_kind", str)  # "text" | "multimodal", once classified
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(request: web.Request) -> str:
    """Keep a sane client `x-request-id` (for tracing across the hop), else make one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else os.urandom(16).hex()  # uuid4's randomness, a tenth of its cost


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (429, 529):
        return "rejected"
    return "client_error" if status < 500 else "error"


def _bounds(config: Config) -> JsonBounds:
    return JsonBounds(config.limits.max_json_objects, config.limits.max_json_items)


class ApiHandler:
    """POST handler for one API route (chat, completions, responses, messages), or for an engine path
    listed in `routes.extra_paths` (`extra`): its body is walked as chat when it has `messages`."""

    def __init__(self, route: Route, *, extra: bool = False) -> None:
        self.route = route
        self.extra = extra

    async def handle(self, request: web.Request) -> web.StreamResponse:
        app = request.app
        config, metrics = app[CONFIG], app[METRICS]
        request_id = request_id_of(request)
        started = time.monotonic()
        outcome = "cancelled"  # overwritten unless the client goes away first
        charge = app[BODIES].charge()  # given back at the end, whatever ends the request
        try:
            response = await self._handle(request, request_id, charge)
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
            charge.release()
            kind = request.get(KIND, "text")
            metrics.request_done(self.route.family, kind, outcome, time.monotonic() - started)

    def _classify(
        self, data: dict[str, Any], texts: Texts, config: Config, spec: ProcessorSpec | None
    ) -> Classification:
        if self.extra:
            # Engine extras (vLLM's /tokenize, /pooling, ...) take chat messages, images included.
            if "messages" not in data:
                return Classification(())
            return classify("chat", data, config.limits, config.gate, spec, texts=texts, quick=True)
        return classify(self.route.kind, data, config.limits, config.gate, spec, texts=texts, quick=True)

    async def _handle(self, request: web.Request, request_id: str, charge: BodyCharge) -> web.StreamResponse:
        app = request.app
        config = app[CONFIG]
        raw = await read_body(
            request, charge, config.server.max_body_bytes, config.server.body_timeout_s, _bounds(config)
        )
        parsed = await parse_body(raw, config.server.max_parse_bytes, app[HOLLOWER])
        data, texts = parsed.data, parsed.texts
        # The parsed tree lives as long as the request, then the bytes sent upstream: up to twice the
        # body in all (base64 runs left in its buffer go upstream from there; see Parsed).
        charge.take(parsed.parsed_nbytes)
        # What goes upstream is serialized from what was checked; only the runs of base64 the walk
        # read through `texts` go as the client's bytes, which are exactly their characters.
        del raw
        spec = app.get(SPEC)
        found = self._classify(data, texts, config, spec)
        await price_deep_headers(found, config.limits, spec, app[HOLLOWER])
        request[KIND] = found.kind
        if found.multimodal:
            charge.mark_image()
        headers = request_headers(request.headers, request_id)
        if REMOTE in app and found.multimodal:
            await app[REMOTE].inline(found.parts, config.limits, spec, charge, texts)
        if config.upstream.mode == "offload":
            if not self.extra:
                return await self._offload(request, request_id, headers, parsed, found)
            if found.multimodal:  # only the API routes are preprocessed; an extra path forwards as is
                raise SidecarError(
                    Cause.BAD_REQUEST,
                    f"{found.parts[0].path}: in offload mode images are accepted on the API routes only",
                    param=found.parts[0].path,
                )
        if not found.multimodal:
            fwd = Forward(request.method, request.raw_path, headers, texts.encode(data), self.route.family, request_id)
            return await app[UPSTREAM].forward(request, fwd)

        assemble: Kind | None = None
        if not self.extra and config.upstream.stream_upgrade and can_upgrade(self.route.kind, data):
            data, assemble = upgrade_request(self.route.kind, data), self.route.kind
        body = texts.encode(data)
        lease = await self._admit(app, found.cost)
        with lease:
            fwd = Forward(
                request.method, request.raw_path, headers, body, self.route.family, request_id, lease, assemble
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
        parsed: Parsed,
        found: Classification,
    ) -> web.StreamResponse:
        """Offload mode: preprocess here, send tensor descriptors, release at the engine's ack.

        The reference engine's ack is its headers (sent once every rank copied its tensors). In front of
        vLLM (`upstream.engine: vllm`, engine/vllm_offload.py) it is the first streamed byte, and a
        non-streaming request goes as a stream: a whole answer's headers come only at the end of
        generation. The stream is re-assembled into vLLM's non-streaming answer, then translated back if
        the route needs it.
        """
        app = request.app
        config = app[CONFIG]
        data, texts = parsed.data, parsed.texts
        if not app[STATE].engine_verified:
            raise SidecarError(
                Cause.UPSTREAM_UNAVAILABLE, "the engine has not been verified to share this /dev/shm yet; retry"
            )
        if not found.multimodal:
            chat, transform = to_chat(self.route, data, found)
            fwd = Forward(
                "POST", CHAT_PATH, headers, texts.encode(chat), self.route.family, request_id, transform=transform
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
            chat, transform = to_chat(self.route, data, found)
            assemble: Kind | None = None
            upstream = config.upstream
            if upstream.engine == "vllm" and upstream.stream_upgrade and can_upgrade("chat", chat):
                chat, assemble = upgrade_request("chat", chat), "chat"
            fwd = Forward(
                "POST",
                CHAT_PATH,
                headers,
                texts.encode(chat),
                self.route.family,
                request_id,
                lease,
                assemble,
                # vLLM sends a stream's headers as soon as it has copied the tensors, before its scheduler
                # has the request: acked there, every queued request's tensors would pile up inside vLLM
                # (bench, offload gate 1: +2.2 GiB, as much as no gate). Its first streamed byte (after
                # prefill) bounds what it holds, as in passthrough; it comes later still, so the extents
                # are never freed before vLLM's copy.
                ack="first_chunk" if upstream.engine == "vllm" else "headers",
                transform=transform,
            )
            return await app[UPSTREAM].forward(request, fwd)


# Methods that read or describe; anything else changes state on the engine and must be a route we know.
_SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))


def normalize_path(path: str) -> str:
    """The path routes are matched on: repeated and trailing slashes, `.` and `..` segments resolved.

    Matching on the normal form means no spelling of an API path (`/v1/chat/completions/`,
    `//v1/chat/completions`, `/v1/./chat/completions`, percent-encoded slashes, which aiohttp has
    decoded in `request.path`) escapes the walker. The engine still gets the path as sent.
    """
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


class Dispatcher:
    """Every request that is not a local endpoint: API routes are walked, listed extras too, safe
    methods pass, and anything else is refused with 404 (routes are denied by default)."""

    def __init__(self, config: Config) -> None:
        self.api = {route.path: ApiHandler(route) for route in ROUTES}
        self.extra = {
            normalize_path(path): ApiHandler(Route(path, family_of_path(path), "chat"), extra=True)
            for path in config.routes.extra_paths
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = normalize_path(request.path)
        if request.method == "POST" and path in self.api:
            return await self.api[path].handle(request)
        if request.method in _SAFE_METHODS:
            return await passthrough(request)
        handler = self.extra.get(path)
        if handler is not None:
            return await handler.handle(request)
        request.app[METRICS].rejections.labels(Cause.NOT_FOUND.code).inc()
        error = SidecarError(
            Cause.NOT_FOUND,
            f"{request.method} {path} is not a route of this server (the sidecar forwards the API routes and "
            "the engine paths listed in routes.extra_paths)",
        )
        return error_response(family_of_path(path), error, request_id=request_id_of(request))


async def passthrough(request: web.Request) -> web.StreamResponse:
    """GET, HEAD and OPTIONS on any other path: forwarded unchanged, never gated."""
    request_id = request_id_of(request)
    family: Family = family_of_path(normalize_path(request.path))
    charge = request.app[BODIES].charge()
    try:
        server = request.app[CONFIG].server
        body = await read_body(request, charge, server.max_body_bytes, server.body_timeout_s)
        headers = request_headers(request.headers, request_id)
        fwd = Forward(request.method, request.raw_path, headers, body, family, request_id)
        return await request.app[UPSTREAM].forward(request, fwd)
    except SidecarError as error:
        return error_response(family, error, request_id=request_id)
    finally:
        charge.release()


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
