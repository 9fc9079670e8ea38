"""The benchmarks' HTTP client: chat-completion bodies, and a POST that records its outcome instead of raising."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson


def chat_body(*, image_url: str | None = None, text: str = "Describe the picture.", max_tokens: int = 1) -> bytes:
    content: Any = text
    if image_url is not None:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    body = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "stream": False,
        "messages": [{"role": "user", "content": content}],
    }
    return orjson.dumps(body)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int  # 0: no HTTP answer
    seconds: float
    started: float  # monotonic
    error: str = ""


async def post(session: Any, url: str, body: bytes) -> Outcome:
    """POST a JSON body and read the whole answer; never raises for HTTP or connection errors."""
    import aiohttp  # noqa: PLC0415

    started = time.monotonic()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            await resp.read()
            return Outcome(resp.status, time.monotonic() - started, started)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return Outcome(0, time.monotonic() - started, started, f"{type(exc).__name__}: {exc}")
