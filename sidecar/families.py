"""API families at the edge: which routes belong to OpenAI or Anthropic, and their error shapes.

OpenAI: `{"error": {"message", "type", "param", "code"}}`.
Anthropic: `{"type": "error", "error": {"type", "message"}}`; overload may be 529 `overloaded_error`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import orjson
from aiohttp import web

from .errors import Cause, SidecarError

Family = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    family: Family
    kind: Literal["chat", "completions", "responses", "messages"]


ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", "openai", "chat"),
    Route("/v1/completions", "openai", "completions"),
    Route("/v1/responses", "openai", "responses"),
    Route("/v1/messages", "anthropic", "messages"),
)


def family_of_path(path: str) -> Family:
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def error_response(
    family: Family,
    error: SidecarError,
    *,
    request_id: str,
    retry_after_s: float | None = None,
    anthropic_overload_status: int = 429,
) -> web.Response:
    status = error.status
    headers = {"x-request-id": request_id}
    if error.cause.retryable and retry_after_s is not None and status in (429, 503):
        # Retry-After is whole seconds by RFC 9110; both official SDKs also honour retry-after-ms.
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        headers["retry-after-ms"] = str(max(1, round(retry_after_s * 1000)))
    if family == "anthropic":
        etype = error.cause.value.anthropic_type
        if status == 429 and anthropic_overload_status == 529:
            status, etype = 529, "overloaded_error"
        body: dict[str, object] = {"type": "error", "error": {"type": etype, "message": error.message}}
    else:
        body = {
            "error": {
                "message": error.message,
                "type": error.cause.value.openai_type,
                "param": error.param,
                "code": error.cause.code,
            }
        }
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def error_event(family: Family, error: SidecarError) -> bytes:
    """An in-band SSE error for a stream whose status line has already been sent."""
    if family == "anthropic":
        payload = {"type": "error", "error": {"type": error.cause.value.anthropic_type, "message": error.message}}
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
    payload = {
        "error": {
            "message": error.message,
            "type": error.cause.value.openai_type,
            "param": error.param,
            "code": error.cause.code,
        }
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


__all__ = ["ROUTES", "Cause", "Family", "Route", "error_event", "error_response", "family_of_path"]
