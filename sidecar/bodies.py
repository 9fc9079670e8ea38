"""The byte budget for request bodies held in memory, all requests together (`server.max_body_memory`).

The sidecar buffers each API request body (it must parse it, and may rewrite it) until the request
ends. Without a bound, a burst of large bodies is exactly the unbounded host memory the sidecar
exists to prevent, so bodies are admitted against a byte budget as they are read; a body that does
not fit is refused at once with 503 rather than queued (its bytes are already on the wire).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from .errors import Cause, SidecarError


@dataclass(slots=True)
class BodyBudget:
    limit: int
    held: int = 0
    peak: int = field(default=0)

    def take(self, nbytes: int) -> None:
        if self.held + nbytes > self.limit:
            raise SidecarError(
                Cause.BODY_MEMORY_FULL,
                f"request bodies in memory would exceed server.max_body_memory={self.limit}; retry later",
            )
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def give(self, nbytes: int) -> None:
        self.held -= nbytes


async def read_body(
    request: web.Request, budget: BodyBudget, max_body_bytes: int, timeout_s: float
) -> tuple[bytes, int]:
    """The whole body, size-capped, time-capped and charged to `budget`; returns (body, bytes charged).

    The time cap is for slow clients (slow loris): a body that trickles in holds memory and a
    connection, so it gets `timeout_s` in all, not per chunk.

    The caller gives the charge back when the request ends (`budget.give`), whatever ends it.
    On an error here, what was charged so far is given back before raising.
    """
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise SidecarError(
            Cause.BODY_TOO_LARGE,
            f"request body is {request.content_length} bytes, more than server.max_body_bytes={max_body_bytes}",
        )
    if request.content.is_eof() and request.content.total_bytes <= max_body_bytes:
        # Already all here (a small body arrives with its headers): no waiting, so no time cap.
        body = request.content.read_nowait()
        budget.take(len(body))
        return body, len(body)
    chunks: list[bytes] = []
    charged = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_chunked(1 << 16):
                if charged + len(chunk) > max_body_bytes:
                    raise SidecarError(
                        Cause.BODY_TOO_LARGE, f"request body is more than server.max_body_bytes={max_body_bytes} bytes"
                    )
                budget.take(len(chunk))
                charged += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        budget.give(charged)
        raise SidecarError(
            Cause.BODY_TIMEOUT, f"request body not received within server.body_timeout_s={timeout_s:g}"
        ) from None
    except BaseException:
        budget.give(charged)
        raise
    return b"".join(chunks), charged
