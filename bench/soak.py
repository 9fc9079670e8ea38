"""Soak: thousands of mixed requests through the sidecar (offload mode) with faults injected at random.

    .venv/bin/python -m bench.soak --requests 5000 --concurrency 32 --seconds 900

The sidecar is the real app with real worker processes and a real /dev/shm arena; the engine is the
protocol-speaking fake of the tests (it really copies the tensors out of the arena), so thousands of
requests fit in minutes on a small machine. Injected at random: client disconnects at random points,
worker kill -9, engine errors (500 before the ack) and engine deaths (connection aborted), and bad
inputs. At the end it prints the outcome counts and the no-leak invariant, and exits non-zero if a
lease, extent, queued waiter or body is left, a worker is missing, or the sidecar answered a 5xx that
was not an injected engine fault.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import os
import random
import signal
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from preprocess.procmem import tree_memory
from preprocess.worker import _trim_heap
from sidecar.app import create_app
from sidecar.config import format_size, from_mapping
from tests.test_offload import FakeEngine


def _png(width: int, height: int, seed: int) -> str:
    image = Image.effect_noise((width, height), 30 + seed % 40).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class _Discard(list[Any]):
    def append(self, item: Any) -> None:
        pass


class Faults:
    """Engine-side faults, decided per request by the soak (recorded so outcomes can be judged)."""

    def __init__(self, rng: random.Random, rate: float) -> None:
        self.rng, self.rate = rng, rate
        self.injected: Counter[str] = Counter()

    async def __call__(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse | None:
        roll = self.rng.random()
        if roll < self.rate / 2:
            self.injected["engine_500"] += 1
            return web.json_response({"error": {"message": "injected", "type": "server_error"}}, status=500)
        if roll < self.rate:
            self.injected["engine_abort"] += 1
            assert request.transport is not None
            request.transport.abort()
            return web.StreamResponse()
        return None


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    engine = FakeEngine()
    engine.received = _Discard()  # the fake keeps what it copied for tests; here it would only grow
    faults = Faults(rng, args.engine_fault_rate)
    engine.behaviour = faults
    engine_runner = web.AppRunner(engine.app())
    await engine_runner.setup()
    engine_site = web.TCPSite(engine_runner, "127.0.0.1", 0)
    await engine_site.start()
    engine_port = engine_runner.addresses[0][1]

    config = from_mapping(
        {
            "server": {"port": 0, "debug_endpoints": True, "body_timeout_s": 10},
            "upstream": {"url": f"http://127.0.0.1:{engine_port}", "mode": "offload", "ack_timeout_s": 10},
            "preprocess": {"processor": args.processor, "workers": args.workers, "task_timeout_s": 20},
            "gate": {"max_concurrent": 4, "max_bytes": "128MiB", "max_queue": 256, "queue_timeout_s": 30},
            "shm": {"name": f"soak-{os.getpid()}"},
        }
    )
    runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
    try:
        return await _drive(args, rng, runner, engine_runner, faults)
    finally:
        await runner.cleanup()
        await engine_runner.cleanup()


async def _drive(
    args: argparse.Namespace, rng: random.Random, runner: web.AppRunner, engine_runner: web.AppRunner, faults: Faults
) -> int:
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    images = [_png(rng.randint(16, 640), rng.randint(16, 480), i) for i in range(12)]
    bad = [
        "data:image/png;base64,AAAA",
        "data:image/png;base64,!!!!",
        "data:text/plain;base64,aGk=",
        "http://169.254.169.254/x",
        _png(8, 8, 0)[:60],
    ]
    outcomes: Counter[str] = Counter()
    limit = asyncio.Semaphore(args.concurrency)
    deadline = time.monotonic() + args.seconds
    kills = 0

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await _wait_verified(http, url)
        idle = tree_memory()

        async def one(i: int) -> None:
            kind_roll = rng.random()
            stream = rng.random() < 0.5
            if kind_roll < 0.35:
                kind, content = "text", "hello"
            elif kind_roll < 0.35 + args.bad_rate:
                kind = "bad"
                content = [{"type": "image_url", "image_url": {"url": rng.choice(bad)}}]
            else:
                kind = "image"
                content = [
                    {"type": "image_url", "image_url": {"url": rng.choice(images)}} for _ in range(rng.randint(1, 3))
                ]
            body = {"model": "m", "max_tokens": 2, "stream": stream, "messages": [{"role": "user", "content": content}]}
            disconnect = rng.random() < args.disconnect_rate
            async with limit:
                if time.monotonic() > deadline:
                    outcomes["not_sent_time_limit"] += 1
                    return
                task = asyncio.create_task(_post(http, url, body))
                if disconnect:
                    await asyncio.sleep(rng.random() * 0.3)
                    task.cancel()
                try:
                    status = await task
                except asyncio.CancelledError:
                    outcomes["client_disconnected"] += 1
                    return
                outcomes[f"{kind}:{status}"] += 1

        async def killer() -> None:
            nonlocal kills
            while time.monotonic() < deadline:
                await asyncio.sleep(args.kill_every_s * (0.5 + rng.random()))
                async with http.get(url + "/debug/state") as resp:
                    pids = (await resp.json())["workers"]["pids"]
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1

        started = time.monotonic()
        kill_task = asyncio.create_task(killer())
        tasks = [asyncio.create_task(one(i)) for i in range(args.requests)]
        for done, finished in enumerate(asyncio.as_completed(tasks), start=1):
            await finished
            if done % 250 == 0:
                print(f"\r{done}/{args.requests}", end="", file=sys.stderr, flush=True)
        kill_task.cancel()
        elapsed = time.monotonic() - started
        print(file=sys.stderr)

        async with asyncio.timeout(60):
            while True:
                async with http.get(url + "/debug/state") as resp:
                    state = await resp.json()
                if not (state["leases"] or state["queued"] or state["inflight"] or state["arena"]["extents"]):
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        # This process also hosts the load generator and the fake engine: give their freed heap back
        # before measuring, so that what remains is what is really still held.
        gc.collect()
        _trim_heap()
        end = tree_memory()

    print(f"\n{args.requests} requests in {elapsed:.0f} s, concurrency {args.concurrency}, seed {args.seed}\n")
    print("| outcome | count |\n|---|---|")
    for key, count in sorted(outcomes.items()):
        print(f"| {key} | {count} |")
    print(f"\ninjected: worker kill -9 x{kills}, " + ", ".join(f"{k} x{v}" for k, v in faults.injected.items()))
    arena, workers = state["arena"], state["workers"]
    print(
        f"invariant: leases {state['leases']}, queued {state['queued']}, in flight {state['inflight']}, "
        f"bodies {state['body_bytes']} B, arena extents {arena['extents']} "
        f"(free {arena['free_bytes']}/{arena['capacity']}), workers alive {workers['alive']}/{args.workers}, "
        f"restarts {workers['restarts']}"
    )
    print(
        f"memory (sidecar tree): idle PSS {format_size(idle.pss_bytes)}, after PSS {format_size(end.pss_bytes)}; "
        f"RSS {format_size(idle.rss_bytes)} -> {format_size(end.rss_bytes)}"
    )
    engine_faults = sum(faults.injected.values())
    sidecar_5xx = sum(v for k, v in outcomes.items() if k.split(":")[-1].startswith("5"))
    # Injected engine faults surface as 500 (passed through) or 502; a worker kill as one 500.
    unexplained = sidecar_5xx - engine_faults - kills  # a kill fails at most the one request it was processing
    leaked = state["leases"] or state["queued"] or state["inflight"] or state["body_bytes"] or arena["extents"]
    ok = not leaked and workers["alive"] == args.workers and unexplained <= 0
    print(
        "RESULT:",
        "PASS" if ok else "FAIL",
        f"(5xx {sidecar_5xx}, injected engine faults {engine_faults}, kills {kills})",
    )
    return 0 if ok else 1


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def _wait_verified(http: aiohttp.ClientSession, url: str) -> None:
    async with asyncio.timeout(120):
        while True:
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=900, help="hard limit on the whole run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--processor", default="llava-1.5")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--disconnect-rate", type=float, default=0.05, dest="disconnect_rate")
    parser.add_argument("--bad-rate", type=float, default=0.1, dest="bad_rate")
    parser.add_argument("--engine-fault-rate", type=float, default=0.04, dest="engine_fault_rate")
    parser.add_argument("--kill-every-s", type=float, default=5.0, dest="kill_every_s")
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
