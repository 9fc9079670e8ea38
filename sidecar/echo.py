"""A small built-in upstream that speaks the OpenAI and Anthropic APIs and echoes what it received.

It stands in for an engine where none runs (`make run` before the reference engine exists, proxy
tests). It answers like vLLM does: headers first, then the first chunk after a "prefill"
(`prefill_s`), then one chunk per token. It counts the multimodal requests it holds before its
first chunk (the stage the sidecar bounds), and `before_first_chunk` lets a test hold, fail or
stall a request at exactly that point.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

Hook = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse | None]]


@dataclass(slots=True)
class EchoStats:
    requests: int = 0
    multimodal_held: int = 0  # multimodal requests received and not yet past their first chunk
    max_multimodal_held: int = 0
    # The latest request bodies (tests read them); bounded, so a long-running echo-upstream does not grow.
    bodies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=64))


def _is_multimodal(body: dict[str, Any]) -> bool:
    # A plain substring test is enough here: the echo only counts, the sidecar classifies.
    raw = orjson.dumps(body.get("messages") or body.get("input") or [])
    return any(t in raw for t in (b'"image_url"', b'"input_image"', b'"image"', b'"video_url"', b'"input_audio"'))


class EchoEngine:
    def __init__(
        self,
        *,
        prefill_s: float = 0.0,
        token_s: float = 0.0,
        tokens: int = 4,
        model: str = "echo",
        before_first_chunk: Hook | None = None,
    ) -> None:
        self.prefill_s = prefill_s
        self.token_s = token_s
        self.tokens = tokens
        self.model = model
        self.before_first_chunk = before_first_chunk
        self.stats = EchoStats()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "mm-sidecar"}]}
        )

    # -- the shared request life: receive, "prefill", first chunk, tokens --------------------
    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], web.StreamResponse | None]:
        body: dict[str, Any] = await request.json(loads=orjson.loads)
        self.stats.requests += 1
        self.stats.bodies.append(body)
        multimodal = _is_multimodal(body)
        if multimodal:
            self.stats.multimodal_held += 1
            self.stats.max_multimodal_held = max(self.stats.max_multimodal_held, self.stats.multimodal_held)
        try:
            if self.prefill_s:
                await asyncio.sleep(self.prefill_s)
            if self.before_first_chunk is not None:
                early = await self.before_first_chunk(request, body)
                if early is not None:
                    return body, early
        finally:
            if multimodal:
                self.stats.multimodal_held -= 1
        return body, None

    def _words(self, body: dict[str, Any]) -> list[str]:
        n = int(body.get("max_tokens") or body.get("max_output_tokens") or body.get("max_completion_tokens") or 0)
        count = min(self.tokens, n) if n > 0 else self.tokens
        return [f"tok{i} " for i in range(count)]

    async def _sse(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, event in enumerate(events):
            if i and self.token_s:
                await asyncio.sleep(self.token_s)
            await resp.write(event)
        await resp.write_eof()
        return resp

    # -- OpenAI chat -------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._begin(request)
        if early is not None:
            return early
        words = self._words(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "total_tokens": 7 + len(words)}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(words)}
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": self.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "length", "logprobs": None}],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events += [chunk({"content": w}, None) for w in words]
        events.append(chunk({}, "length"))
        if (body.get("stream_options") or {}).get("include_usage"):
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model}
            events.append(b"data: " + orjson.dumps({**obj, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._sse(request, events)

    # -- OpenAI completions ------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._begin(request)
        if early is not None:
            return early
        words = self._words(body)
        rid, created = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        usage = {"prompt_tokens": 3, "completion_tokens": len(words), "total_tokens": 3 + len(words)}
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model}
        if not body.get("stream"):
            choice = {"index": 0, "text": "".join(words), "finish_reason": "length", "logprobs": None}
            return web.json_response({**base, "choices": [choice], "usage": usage})
        events = [
            b"data: "
            + orjson.dumps({**base, "choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": None}]})
            + b"\n\n"
            for w in words
        ]
        last = {**base, "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": None}]}
        events.append(b"data: " + orjson.dumps(last) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._sse(request, events)

    # -- OpenAI responses --------------------------------------------------------------------
    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._begin(request)
        if early is not None:
            return early
        words = self._words(body)
        rid, mid = f"resp_{uuid.uuid4().hex[:12]}", f"msg_{uuid.uuid4().hex[:12]}"
        text = "".join(words)
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        usage = {"input_tokens": 7, "output_tokens": len(words), "total_tokens": 7 + len(words)}
        final = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": self.model,
            "output": [item],
            "usage": usage,
        }
        if not body.get("stream"):
            return web.json_response(final)
        seq = iter(range(1 << 30))

        def ev(etype: str, **fields: Any) -> bytes:
            data = orjson.dumps({"type": etype, "sequence_number": next(seq), **fields})
            return b"event: " + etype.encode() + b"\ndata: " + data + b"\n\n"

        started = {**final, "status": "in_progress", "output": [], "usage": None}
        events = [ev("response.created", response=started)]
        empty_item = {**item, "status": "in_progress", "content": []}
        events.append(ev("response.output_item.added", output_index=0, item=empty_item))
        events += [
            ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=w) for w in words
        ]
        events.append(ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text))
        events.append(ev("response.output_item.done", output_index=0, item=item))
        events.append(ev("response.completed", response=final))
        return await self._sse(request, events)

    # -- Anthropic messages ------------------------------------------------------------------
    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, early = await self._begin(request)
        if early is not None:
            return early
        words = self._words(body)
        mid = f"msg_{uuid.uuid4().hex[:12]}"
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": "".join(words)}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": len(words)},
        }
        if not body.get("stream"):
            return web.json_response(message)

        def ev(etype: str, **fields: Any) -> bytes:
            return b"event: " + etype.encode() + b"\ndata: " + orjson.dumps({"type": etype, **fields}) + b"\n\n"

        start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": 7, "output_tokens": 0}}
        events = [
            ev("message_start", message=start),
            ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        ]
        events += [ev("content_block_delta", index=0, delta={"type": "text_delta", "text": w}) for w in words]
        events.append(ev("content_block_stop", index=0))
        events.append(
            ev(
                "message_delta",
                delta={"stop_reason": "max_tokens", "stop_sequence": None},
                usage={"output_tokens": len(words)},
            )
        )
        events.append(ev("message_stop"))
        return await self._sse(request, events)
