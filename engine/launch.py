"""`mm-sidecar engine`: start the rank processes of the reference engine and supervise them.

The launcher spawns `tp` rank processes joined by torch.distributed (gloo on CPU, nccl when CUDA
is present) for the model's tensors, and by a pipe between rank 0 and each other rank for commands
(engine/ranks.py says why). Rank 0 serves HTTP; the others follow its commands. If any rank dies,
the launcher stops the rest and exits non-zero (an engine is all ranks or nothing); SIGTERM/SIGINT
stop them all.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

log = logging.getLogger("mm_engine")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    tp: int = 2
    host: str = "127.0.0.1"
    port: int = 8001
    uds: str | None = None
    shm_dir: str = "/dev/shm"
    checksums: bool = False
    # Per rank: the most host memory its staging pool keeps for handed-off tensors, in use and cached
    # (engine/staging.py; the same default as engine.staging.DEFAULT_CAP_BYTES, not imported: torch).
    staging_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if self.staging_bytes < 0:
            raise ValueError(f"staging_bytes: must be >= 0, got {self.staging_bytes}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rank_main(rank: int, config: EngineConfig, master_port: int, links: list[Connection]) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(config.tp),
    )
    # Torch's CPU allocator reads this once, when torch loads: allocations of 2 MiB and more are then
    # 2 MiB-aligned and madvised as transparent huge pages, so a fresh tensor (the inline path's
    # pixel_values, build_inputs' concatenation, a copy the staging pool has no room for) faults once
    # per 2 MiB instead of once per 4 KiB page: 50 MB copied into a fresh tensor went from 2.2 to 5.9
    # GB/s (bench/RESULTS.md, handoff). An operator's own setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch  # noqa: PLC0415 - heavy: only in the rank processes
    import torch.distributed as dist  # noqa: PLC0415

    from .model import VLModel  # noqa: PLC0415
    from .ranks import Rank  # noqa: PLC0415
    from .staging import StagingPool  # noqa: PLC0415

    device = "cpu"
    if config.tp > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=config.tp)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    model = VLModel.load(config.model, tp=config.tp > 1, device=device)
    state = Rank(
        model=model,
        shm_dir=config.shm_dir,
        world=config.tp,
        rank=rank,
        links=links,
        staging=StagingPool(config.staging_bytes),
    )
    try:
        if rank == 0:
            asyncio.run(_serve(state, config))
        else:
            state.follow()
    finally:
        if config.tp > 1:
            dist.destroy_process_group()


async def _serve(state: object, config: EngineConfig) -> None:
    from aiohttp import web  # noqa: PLC0415

    from .ranks import Rank  # noqa: PLC0415
    from .server import create_engine_app  # noqa: PLC0415

    assert isinstance(state, Rank)
    app = create_engine_app(state, model_dir=config.model, shm_dir=config.shm_dir, checksums=config.checksums)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if config.uds:
        site = web.UnixSite(runner, config.uds)
    else:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    where = config.uds or f"http://{config.host}:{config.port}"
    log.info("engine ready on %s (model %s, tp=%d)", where, state.model.model_name, config.tp)
    print(f"mm-engine ready on {where}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_engine(config: EngineConfig) -> int:
    """Start the ranks and wait; returns the exit code."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    pipes = [ctx.Pipe(duplex=True) for _ in range(1, config.tp)]
    links: list[list[Connection]] = [[leader for leader, _ in pipes]] + [[follower] for _, follower in pipes]
    procs = [
        ctx.Process(target=_rank_main, args=(r, config, port, links[r]), name=f"rank{r}") for r in range(config.tp)
    ]
    for p in procs:
        p.start()
    for pair in pipes:  # the ranks hold their ends now: a rank that dies must leave its peer reading EOF
        for end in pair:
            end.close()

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if procs[0].is_alive() and procs[0].pid is not None:
            os.kill(procs[0].pid, signal.SIGTERM)  # rank 0 stops the others with its Stop command

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while procs:
        multiprocessing.connection.wait([p.sentinel for p in procs])
        for p in [p for p in procs if not p.is_alive()]:
            procs.remove(p)
            if p.exitcode != 0 and not stopping:
                log.error("%s exited with %s; stopping the engine", p.name, p.exitcode)
                code = 1
                for other in procs:
                    other.kill()
            if stopping and procs:
                for other in procs:
                    other.join(10)
                    if other.is_alive():
                        other.kill()
    return code


if __name__ == "__main__":  # pragma: no cover - use `mm-sidecar engine`
    sys.exit(run_engine(EngineConfig(model=sys.argv[1])))
