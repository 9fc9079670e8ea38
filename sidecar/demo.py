"""`mm-sidecar demo --url URL`: a mixed burst through a running sidecar, and a table of what happened.

Text and images of several sizes, streaming and not, all at once, so the gate has a queue to manage
and text has a chance to be stalled (it must not be). While the burst runs, the sidecar's
`/metrics` (its process tree's memory) and the engine's `/health` (its ranks' memory) are sampled
to report peaks, and a progress bar shows the requests completed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from PIL import Image

from .config import format_size

SIZES = ((320, 240), (800, 600), (1280, 720), (1920, 1080))


@dataclass
class Outcome:
    kind: str  # "text" | "image"
    stream: bool
    status: int
    seconds: float


@dataclass
class Peaks:
    sidecar_rss: int = 0
    sidecar_pss: int = 0
    engine_rss: int = 0
    engine_pss: int = 0
    samples: int = 0
    queue_wait: list[float] = field(default_factory=list)


def _image(width: int, height: int, seed: int) -> str:
    rng = random.Random(seed)
    image = Image.effect_noise((width, height), 40 + rng.random() * 30).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def _sample(
    session: aiohttp.ClientSession, url: str, engine: str | None, peaks: Peaks, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
            peaks.sidecar_rss = max(peaks.sidecar_rss, int(_metric(text, "mm_sidecar_process_tree_rss_bytes") or 0))
            peaks.sidecar_pss = max(peaks.sidecar_pss, int(_metric(text, "mm_sidecar_process_tree_pss_bytes") or 0))
            if engine:
                async with session.get(engine + "/health") as resp:
                    memory = (await resp.json()).get("memory") or {}
                peaks.engine_rss = max(peaks.engine_rss, int(memory.get("rss_bytes", 0)))
                peaks.engine_pss = max(peaks.engine_pss, int(memory.get("pss_bytes", 0)))
            peaks.samples += 1
        except (aiohttp.ClientError, OSError, ValueError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], kind: str) -> Outcome:
    started = time.monotonic()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
            status = resp.status
    except (aiohttp.ClientError, OSError):
        status = 0
    return Outcome(kind, bool(body.get("stream")), status, time.monotonic() - started)


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.0f} ms"


async def run_demo(url: str, engine: str | None, requests: int, model: str) -> int:
    url = url.rstrip("/")
    print(f"building {len(SIZES)} test images...", file=sys.stderr)
    images = [await asyncio.to_thread(_image, w, h, i) for i, (w, h) in enumerate(SIZES)]
    bodies: list[tuple[str, dict[str, Any]]] = []
    for i in range(requests):
        stream = i % 2 == 1
        if i % 3 == 0:
            content: Any = "Say something."
            kind = "text"
        else:
            content = [
                {"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                {"type": "text", "text": "?"},
            ]
            kind = "image"
        body = {"model": model, "max_tokens": 4, "stream": stream, "messages": [{"role": "user", "content": content}]}
        bodies.append((kind, body))

    peaks, stop = Peaks(), asyncio.Event()
    outcomes: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url + "/metrics") as resp:
            before = await resp.text()
        sampler = asyncio.create_task(_sample(session, url, engine, peaks, stop))
        started = time.monotonic()
        tasks = [asyncio.create_task(_one(session, url, body, kind)) for kind, body in bodies]
        for done in asyncio.as_completed(tasks):
            outcomes.append(await done)
            n = len(outcomes)
            bar = "#" * (30 * n // len(tasks))
            print(f"\r[{bar:<30}] {n}/{len(tasks)}", end="", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
        print(file=sys.stderr)
        stop.set()
        await sampler
        async with session.get(url + "/metrics") as resp:
            after = await resp.text()

    waits = (_metric(after, "mm_sidecar_queue_wait_seconds_sum") or 0) - (
        _metric(before, "mm_sidecar_queue_wait_seconds_sum") or 0
    )
    admitted = (_metric(after, "mm_sidecar_queue_wait_seconds_count") or 0) - (
        _metric(before, "mm_sidecar_queue_wait_seconds_count") or 0
    )
    print(f"\n{len(outcomes)} requests in {elapsed:.1f} s ({len(outcomes) / elapsed:.1f} req/s) to {url}\n")
    print("| kind | stream | requests | ok | other outcomes | p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("text", "image"):
        for stream in (False, True):
            group = [o for o in outcomes if o.kind == kind and o.stream == stream]
            ok = [o for o in group if o.status == 200]
            counts = Counter(o.status for o in group if o.status != 200)
            others = ", ".join(f"{status} x{n}" for status, n in sorted(counts.items())) or "-"
            lat = [o.seconds for o in ok]
            print(f"| {kind} | {stream} | {len(group)} | {len(ok)} | {others} | {_pct(lat, 0.5)} | {_pct(lat, 0.99)} |")
    mean_wait = waits / admitted if admitted else 0.0
    print(f"\nqueue wait (multimodal, from the sidecar's metrics): mean {mean_wait * 1000:.0f} ms over {admitted:.0f}")
    print(
        f"peak memory ({peaks.samples} samples): sidecar + workers RSS {format_size(peaks.sidecar_rss)}, "
        f"PSS {format_size(peaks.sidecar_pss)}"
    )
    if engine:
        engine_memory = f"RSS {format_size(peaks.engine_rss)}, PSS {format_size(peaks.engine_pss)}"
        print(f"{'':22}engine ranks {engine_memory}")
    failed = [o for o in outcomes if o.status != 200]
    return 1 if failed and len(failed) == len(outcomes) else 0
