"""The preprocessing stage as one object: the arena, the worker pool, and the life of each extent.

An extent is freed exactly once, when two things are both true (`ExtentHold`):
1. its owner is done with it: the engine acknowledged the tensors, or the request failed, timed
   out, was cancelled or the sidecar is shutting down (`ExtentHold.release`), and
2. no worker can still write into it: the task never ran, finished, or its worker is dead
   (`ExtentHold.settled`, the pool's `on_settled`).
A client that disconnects while its image is being processed therefore frees the extent when the
worker is done with it, and a worker killed mid-write frees it only once the process is gone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .arena import Arena, ArenaStats, segment_name, unlink_stale
from .extents import Extent
from .pool import WorkerPool, WorkerPoolStats
from .protocol import TensorDescriptor
from .spans import Text
from .worker import ImageResult, ImageTask, Shapes, WorkerSetup, WorkerState, process_image, stage

log = logging.getLogger("mm_sidecar.pipeline")


@dataclass(eq=False)
class ExtentHold:
    """One extent and the two conditions for freeing it (see the module docstring)."""

    extent: Extent
    _free: Callable[[Extent], None] = field(repr=False)
    released: bool = False
    settled: bool = True  # becomes False while a task may write into it
    freed: bool = False

    def release(self) -> None:
        self.released = True
        self._maybe_free()

    def settle(self) -> None:
        self.settled = True
        self._maybe_free()

    def _maybe_free(self) -> None:
        if self.released and self.settled and not self.freed:
            self.freed = True
            self._free(self.extent)


@dataclass(frozen=True, slots=True)
class Processed:
    tensors: dict[str, TensorDescriptor]
    result: ImageResult


class ImagePipeline:
    def __init__(
        self,
        *,
        processor: str,
        workers: int,
        task_timeout_s: float,
        instance: str,
        directory: str,
        size: int,
        on_restart: Callable[[str], None] | None = None,
        on_free: Callable[[], None] | None = None,
        nice: int = 0,
        fast_path: bool = True,
        pixels: str = "float32",
    ) -> None:
        self.processor = processor
        self.fast_path = fast_path  # preprocess.fast_path (preprocess.fastpath, where it covers the processor)
        self.pixels = pixels  # preprocess.transport_dtype
        self._nice = nice
        self._on_free = on_free  # memory came back (the gate may admit a waiter)
        self.directory = directory
        self.instance = instance
        self.size = size
        self._workers = workers
        self._timeout = task_timeout_s
        self._on_restart = on_restart
        self.arena: Arena | None = None
        self.pool: WorkerPool[WorkerState, ImageTask, ImageResult] | None = None
        self._holds: set[ExtentHold] = set()

    async def start(self) -> None:
        prefix = f"mm-sidecar-{self.instance}-"
        for name in unlink_stale(self.directory, prefix):
            log.warning("removed stale shared-memory segment %s/%s left by a dead sidecar", self.directory, name)
        name = segment_name(self.instance, os.getpid())
        self.arena = Arena.create(name, self.size, directory=self.directory)
        self.pool = WorkerPool(
            workers=self._workers,
            init=WorkerSetup(self.processor, name, self.directory, self.fast_path, self.pixels),
            job=process_image,
            task_timeout_s=self._timeout,
            on_restart=self._on_restart,
            nice=self._nice,
        )
        try:
            await self.pool.start()
        except BaseException:
            await self.pool.close()
            self.arena.close()
            raise

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()  # every running task settles as its worker exits
        for hold in list(self._holds):
            hold.release()
        if self.arena is not None:
            self.arena.close()

    @property
    def capacity(self) -> int:
        assert self.arena is not None, "start() first"
        return self.arena.capacity

    def stats(self) -> tuple[ArenaStats, WorkerPoolStats]:
        assert self.arena is not None and self.pool is not None, "start() first"
        return self.arena.stats(), self.pool.stats()

    # -- extents ---------------------------------------------------------------------------
    def reserve(self, nbytes: int) -> ExtentHold | None:
        assert self.arena is not None, "start() first"
        extent = self.arena.reserve(nbytes)
        if extent is None:
            return None
        hold = ExtentHold(extent, self._free)
        self._holds.add(hold)
        return hold

    def _free(self, extent: Extent) -> None:
        assert self.arena is not None
        self._holds = {h for h in self._holds if h.extent != extent}
        self.arena.free(extent)
        if self._on_free is not None:
            self._on_free()

    def allocate(self, sizes: tuple[int, ...]) -> list[ExtentHold] | None:
        """One extent per size, all or none (the gate's Allocator)."""
        holds: list[ExtentHold] = []
        for size in sizes:
            hold = self.reserve(size)
            if hold is None:
                for made in holds:
                    made.release()
                return None
            holds.append(hold)
        return holds

    def free(self, handle: object) -> None:
        """Release a request's extents (the gate's Allocator); each is freed once no worker writes it."""
        assert isinstance(handle, list)
        for hold in handle:
            hold.release()

    # -- work ------------------------------------------------------------------------------
    async def process(self, hold: ExtentHold, data: bytes | Text, expected: Shapes) -> Processed:
        """Decode and preprocess one image into `hold`'s extent; publish it; return its descriptors.

        On success the extent stays reserved until `hold.release()` (after the engine's ack). On
        failure or cancellation the caller still calls `hold.release()`; the pages are freed once
        the worker can no longer write them.
        """
        assert self.pool is not None and self.arena is not None, "start() first"
        # Before the hold is marked unsettled: if the copy fails, the extent is still freed on release.
        payload = stage(self.arena, hold.extent, data)
        hold.settled = False
        result = await self.pool.run(ImageTask(payload, hold.extent, expected), on_settled=hold.settle)
        self.arena.publish(hold.extent, result.used_nbytes)
        tensors = {name: TensorDescriptor.from_json(d) for name, d in result.tensors.items()}
        return Processed(tensors, result)
