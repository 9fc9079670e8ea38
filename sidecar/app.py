"""The app factory and the resources an app owns, each in a `cleanup_ctx` (torn down in reverse order).

`create_app(config)` builds everything from the config and holds no global state, so tests can run
many apps side by side. `serve(config)` runs one with the shutdown order operators expect:
SIGTERM -> `/readyz` 503, new API requests and queued waiters 503 at once -> in-flight requests finish
within `server.shutdown_timeout_s` -> listeners close -> upstream session closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from preprocess.fetch import FetchPolicy, SafeFetcher
from preprocess.pipeline import ImagePipeline
from preprocess.processors import read_spec, resolve_processor
from preprocess.procmem import tree_memory
from preprocess.protocol import segment_size_for, shm_token

from .app_keys import (
    BODIES,
    CONFIG,
    HOLLOWER,
    METRICS,
    PIPELINE,
    POOL,
    REMOTE,
    RESOLVER,
    SPEC,
    STATE,
    UPSTREAM,
    ServerState,
)
from .bodies import BodyBudget
from .config import Config, format_size
from .connections import make_runner
from .errors import Cause, SidecarError
from .families import error_response, family_of_path
from .gate import SHUTTING_DOWN_MESSAGE, SlotPool
from .heap import GcPauses, freeze_heap
from .hollow import background_executor
from .metrics import Metrics
from .offload import verify_shared_memory
from .remote import RemoteImages
from .routes import Dispatcher, debug_state, healthz, readyz, request_id_of
from .schedstat import run_queue_wait
from .upstream import Upstream

log = logging.getLogger("mm_sidecar")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count API requests in flight, and refuse new ones with 503 once shutdown has begun."""
    config = request.app[CONFIG]
    if request.path in ("/healthz", "/readyz", "/debug/state", config.metrics.path):
        return await handler(request)
    state = request.app[STATE]
    if state.draining:
        error = SidecarError(Cause.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)
        return error_response(
            family_of_path(request.path),
            error,
            request_id=request_id_of(request),
            retry_after_s=config.gate.retry_after_s,
        )
    inflight = request.app[METRICS].inflight
    state.enter()
    inflight.inc()
    try:
        return await handler(request)
    finally:
        state.leave()
        inflight.dec()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    upstream = Upstream(app[CONFIG].upstream, app[METRICS])
    app[UPSTREAM] = upstream
    yield
    await upstream.close()


async def _remote_ctx(app: web.Application) -> AsyncIterator[None]:
    limits = app[CONFIG].limits
    if not limits.allow_remote_urls:
        yield
        return
    policy = FetchPolicy(
        max_bytes=limits.max_image_bytes,
        timeout_s=limits.fetch_timeout_s,
        max_redirects=limits.max_redirects,
        allowed_hosts=limits.allowed_hosts,
        allowed_networks=limits.allowed_networks,
    )
    fetcher = SafeFetcher(policy, resolver=app.get(RESOLVER))
    app[REMOTE] = RemoteImages(fetcher, app[CONFIG].preprocess.max_concurrent_fetches, app[METRICS])
    yield
    await fetcher.close()


async def _offload_ctx(app: web.Application) -> AsyncIterator[None]:
    """Offload mode: the arena and the workers, and the check that the engine shares our /dev/shm."""
    config, metrics, pool = app[CONFIG], app[METRICS], app[POOL]
    if config.upstream.mode != "offload":
        yield
        return
    assert config.preprocess.processor is not None  # the config refuses offload without one
    loop = asyncio.get_running_loop()
    pipeline = ImagePipeline(
        processor=config.preprocess.processor,
        workers=config.preprocess.workers,
        task_timeout_s=config.preprocess.task_timeout_s,
        nice=config.preprocess.worker_nice,
        fast_path=config.preprocess.fast_path,
        pixels=config.preprocess.transport_dtype,
        instance=config.shm.name,
        directory=config.shm.dir,
        # Data pages for exactly gate.max_bytes; the header page and the page table come on top.
        size=segment_size_for(config.gate.max_bytes),
        on_restart=lambda reason: metrics.worker_restarts.labels(reason).inc(),
        # Deferred frees (a worker finishing after its request ended) must wake queued requests;
        # scheduled, not called, so that a free inside a lease release never re-enters the pool.
        on_free=lambda: _call_soon(loop, pool.wake),
    )
    await pipeline.start()
    app[PIPELINE] = pipeline
    assert pipeline.capacity >= config.gate.max_bytes
    pool.attach_allocator(pipeline, config.gate.max_bytes)  # the budget is exactly what was configured
    metrics.arena_free_bytes.set_function(lambda: pipeline.stats()[0].largest_free)
    log.info(
        "offload: arena %s/%s, %s for tensors, %d workers with processor %s",
        config.shm.dir,
        pipeline.arena.name if pipeline.arena else "?",
        format_size(pipeline.capacity),
        config.preprocess.workers,
        config.preprocess.processor,
    )
    watcher = asyncio.create_task(_verify_engine(app))
    yield
    watcher.cancel()
    pool.close()
    await pipeline.close()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    loop.call_soon(callback)


async def _verify_engine(app: web.Application) -> None:
    """Wait for the engine, then check it sees our /dev/shm; refuse to run (exit 2) if it does not.

    In the background, so the sidecar answers /healthz while the engine starts (a Kubernetes
    native sidecar starts before the engine); /readyz and offload requests wait for the check.
    """
    config, state, upstream = app[CONFIG], app[STATE], app[UPSTREAM]
    token = shm_token(config.shm.dir)
    while True:
        try:
            problem = await verify_shared_memory(
                upstream.session, upstream.base, config.upstream.health_path, token, config.preprocess.transport_dtype
            )
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            await asyncio.sleep(0.5)
            continue
        if problem is None:
            state.engine_verified = True
            log.info("offload: the engine shares this /dev/shm (token %s)", token)
            return
        log.error("offload mode refused: %s", problem)
        state.exit_code = 2
        state.stop.set()
        return


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample how late the loop runs a 10 ms timer (anything that blocks it shows up here), the loop
    thread's CPU wait over windows of about 100 ms, and the process tree's memory every second, in a thread.

    Every 10 ms, not 100: a timer sees a stall only if the stall covers its due time, so a 100 ms timer
    saw a 20 ms stall one time in five; a 10 ms one sees every stall over 10 ms, as a lag between the
    stall less 10 ms and the stall. The cost is a loop wake-up per sample: 1.2-1.5% of a core measured on
    the 2-core dev VM, where waking an idle vCPU alone costs ~50 us (0.4-0.6% with the old 100 ms timer).
    The CPU wait reads a /proc file, so it keeps 100 ms windows. Each tick also moves the garbage
    collector's pauses since the last one into their histogram (heap.GcPauses).
    """
    metrics = app[METRICS]
    histogram, cpu_wait = metrics.loop_lag, metrics.loop_cpu_wait
    pauses = GcPauses()
    pause_by_generation = [metrics.gc_pause.labels(generation=str(g)) for g in range(3)]
    interval_s, window_s = 0.01, 0.1
    loop = asyncio.get_running_loop()
    waited = run_queue_wait()
    window_end = loop.time() + window_s
    timer: asyncio.TimerHandle

    def sample(due: float) -> None:
        # A timer callback rather than a task that sleeps: no future or task step per sample, a
        # fifth less CPU at 100 samples a second.
        nonlocal timer, waited, window_end
        now = loop.time()
        histogram.observe(max(0.0, now - due))
        for generation, seconds in pauses.drain():
            pause_by_generation[generation].observe(seconds)
        if now >= window_end:
            window_end = now + window_s
            if waited is not None and (got := run_queue_wait()) is not None:
                cpu_wait.observe(got - waited)
                waited = got
        timer = loop.call_at(now + interval_s, sample, now + interval_s)

    async def memory() -> None:
        while True:
            tree = await asyncio.to_thread(tree_memory)  # smaps_rollup of the tree: off the loop
            metrics.tree_rss.set(tree.rss_bytes)
            metrics.tree_pss.set(tree.pss_bytes)
            await asyncio.sleep(1.0)

    pauses.install()
    due = loop.time() + interval_s
    timer = loop.call_at(due, sample, due)
    task = asyncio.create_task(memory())
    yield
    pauses.remove()
    timer.cancel()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _hollow_ctx(app: web.Application) -> AsyncIterator[None]:
    app[HOLLOWER] = background_executor()
    yield
    app[HOLLOWER].shutdown(wait=False, cancel_futures=True)


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    # Nothing is admitted from here on. Whatever queued since `drain` (nothing: it stops the queue),
    # or in an app torn down without draining (tests, a fatal start-up check), gets a clean 503;
    # leases still held are released by their handlers' finally.
    app[POOL].close()


def create_app(
    config: Config, *, registry: CollectorRegistry | None = None, resolver: AbstractResolver | None = None
) -> web.Application:
    """The sidecar app. `resolver` replaces DNS for remote image fetches (tests; custom DNS)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    gate = config.gate
    pool = SlotPool(
        max_concurrent=gate.max_concurrent,
        max_bytes=gate.max_bytes,
        max_queue=gate.max_queue,
        queue_timeout_s=gate.queue_timeout_s,
        on_change=metrics.pool_changed,
    )
    metrics.pool_changed(pool.stats())

    # Bodies are read by our own size-capped reader; aiohttp's cap only guards other paths.
    app = web.Application(middlewares=[drain_middleware], client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[POOL] = pool
    app[STATE] = ServerState()
    app[BODIES] = BodyBudget(config.server.max_body_memory, config.server.text_body_share)
    if config.preprocess.processor is not None:
        spec = read_spec(resolve_processor(config.preprocess.processor))
        if config.upstream.mode == "offload":  # the pixels the arena holds (passthrough: the engine's own)
            spec = dataclasses.replace(spec, pixel_dtype=config.preprocess.transport_dtype)
        app[SPEC] = spec
    if resolver is not None:
        app[RESOLVER] = resolver
    app.cleanup_ctx.append(_loop_lag_ctx)
    app.cleanup_ctx.append(_hollow_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_remote_ctx)
    app.cleanup_ctx.append(_pool_ctx)
    app.cleanup_ctx.append(_offload_ctx)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get(config.metrics.path, make_aiohttp_handler(registry))
    if config.server.debug_endpoints:
        app.router.add_get("/debug/state", debug_state)
    # Everything else: API routes walked, listed engine paths too, safe methods passed, the rest 404.
    app.router.add_route("*", "/{tail:.*}", Dispatcher(config).handle)
    return app


async def drain(app: web.Application, timeout_s: float) -> bool:
    """Stop taking API requests and wait for those in flight; True if all finished in time.

    Requests queued for a slot are answered at once (503 shutting_down with Retry-After, in their
    API family's shape, by their handlers): a slot may not come free before the deadline, and a
    client told now retries on another replica instead of waiting to be dropped. Requests holding
    a lease keep the whole deadline.
    """
    state = app[STATE]
    state.draining = True
    refused = app[POOL].drain()
    log.info(
        "draining: %d API requests in flight (%d queued for a slot: refused), waiting up to %.1f s",
        state.inflight,
        refused,
        timeout_s,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await state.idle.wait()
        return True
    except TimeoutError:
        log.warning("drain deadline passed with %d requests in flight; cancelling them", state.inflight)
        return False


async def serve(
    config: Config,
    *,
    ready: Callable[[str], None] | None = None,
    on_app: Callable[[web.Application], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or a fatal check), then shut down in order; returns the exit code.

    `ready` gets the listening address; `on_app` the app before it starts, for a supervisor that may
    stop it (`app[STATE].exit_code`, then `app[STATE].stop.set()`)."""
    app = create_app(config)
    if on_app is not None:
        on_app(app)
    runner = make_runner(app, config.server)  # header and keep-alive timeouts, handler cancellation
    await runner.setup()
    # Start-up's objects (imports, config, app) exempt from collections from here on: a full
    # collection over them held the loop 12-20 ms (sidecar/heap.py).
    app[METRICS].gc_frozen.set(freeze_heap())
    site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
    await site.start()
    address = _address(runner)
    log.info("mm-sidecar listening on %s (upstream %s, mode %s)", address, config.upstream.url, config.upstream.mode)
    if ready is not None:
        ready(address)

    stop = app[STATE].stop
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutdown requested")
        await drain(app, config.server.shutdown_timeout_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        log.info("mm-sidecar stopped")
    return app[STATE].exit_code


def _address(runner: web.AppRunner) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            host, port = addr[0], addr[1]
            return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    return str(runner.addresses[0]) if runner.addresses else "?"
