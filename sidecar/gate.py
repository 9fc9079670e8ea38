"""The slot pool: at most N multimodal requests and B bytes admitted at once, with a bounded FIFO queue.

A `Lease` is what a request holds while it is in the expensive stage (the engine's preprocessing in
passthrough mode, the arena extent in offload mode). It is released exactly once, whatever ends the
request: the engine's ack, an error, a timeout, a client disconnect (the handler is cancelled),
or shutdown. `release()` is synchronous, so a `finally:` releases even while the task is being
cancelled, with no await that the cancellation could interrupt.

The queue is strict FIFO: a large request at the head is not overtaken by smaller ones behind it,
so it cannot starve. A request whose cost can never fit (`nbytes > max_bytes`) is refused at once.

Shutdown has two steps: `drain()` when draining begins (queued waiters fail with SHUTTING_DOWN at once,
nobody queues any more, held leases are untouched), then `close()` at teardown (nothing is admitted).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from .errors import Cause, SidecarError

# One answer for every request refused because shutdown began: queued here, or arriving after it
# (app.drain_middleware).
SHUTTING_DOWN_MESSAGE = "the sidecar is shutting down; retry on another replica"


class Allocator(Protocol):
    """Backs the pool's byte budget with real memory (offload mode: arena extents).

    `allocate` is all-or-nothing for one request's pieces; None means "not now" (fragmentation),
    and the request waits like one that does not fit the budget. `free` may defer the actual
    freeing (a worker still writing); the allocator then calls `SlotPool.wake()` when it happens.
    """

    def allocate(self, sizes: tuple[int, ...]) -> object | None: ...

    def free(self, handle: object) -> None: ...


@dataclass(slots=True)
class Lease:
    """One admitted request's claim on the pool. Use as a context manager or call `release()`."""

    id: int
    nbytes: int
    granted_at: float
    _pool: SlotPool | None = field(repr=False)
    memory: object = None  # the allocator's handle (offload: the request's extents)

    @property
    def released(self) -> bool:
        return self._pool is None

    def release(self) -> bool:
        """Give the slot and bytes back; True the first time, False on every later call."""
        pool, self._pool = self._pool, None
        if pool is None:
            return False
        pool._return(self)
        return True

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@dataclass(frozen=True, slots=True)
class PoolStats:
    leases: int
    reserved_bytes: int
    queued: int
    max_concurrent: int
    max_bytes: int
    max_queue: int


@dataclass(slots=True)
class _Waiter:
    nbytes: int
    sizes: tuple[int, ...]
    future: asyncio.Future[Lease]


class SlotPool:
    def __init__(
        self,
        *,
        max_concurrent: int,
        max_bytes: int,
        max_queue: int,
        queue_timeout_s: float,
        on_change: Callable[[PoolStats], None] | None = None,
        allocator: Allocator | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_bytes = max_bytes
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._on_change = on_change
        self._allocator = allocator
        self._ids = itertools.count(1)
        self._leases: dict[int, Lease] = {}
        self._reserved = 0
        self._waiters: deque[_Waiter] = deque()
        self._draining = False
        self._closed = False

    def attach_allocator(self, allocator: Allocator, max_bytes: int) -> None:
        """Back the byte budget with real memory from now on (offload: the arena, once created)."""
        self._allocator = allocator
        self.max_bytes = max_bytes
        self._notify()

    # -- state -----------------------------------------------------------------------------
    def stats(self) -> PoolStats:
        return PoolStats(
            leases=len(self._leases),
            reserved_bytes=self._reserved,
            queued=len(self._waiters),
            max_concurrent=self.max_concurrent,
            max_bytes=self.max_bytes,
            max_queue=self.max_queue,
        )

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change(self.stats())

    def _try_grant(self, nbytes: int, sizes: tuple[int, ...]) -> Lease | None:
        if len(self._leases) >= self.max_concurrent or self._reserved + nbytes > self.max_bytes:
            return None
        memory = None
        if self._allocator is not None:
            memory = self._allocator.allocate(sizes)
            if memory is None:
                return None
        lease = Lease(id=next(self._ids), nbytes=nbytes, granted_at=time.monotonic(), _pool=self, memory=memory)
        self._leases[lease.id] = lease
        self._reserved += nbytes
        return lease

    # -- admission -------------------------------------------------------------------------
    def try_acquire(self, nbytes: int, sizes: tuple[int, ...] = ()) -> Lease | None:
        """A lease now if one is free and nobody is queued ahead, else None."""
        self._check_admissible(nbytes)
        if self._waiters:
            return None
        lease = self._try_grant(nbytes, sizes)
        if lease is not None:
            self._notify()
        return lease

    async def acquire(self, nbytes: int, sizes: tuple[int, ...] = ()) -> Lease:
        """Wait (FIFO, bounded) for a lease; raises SidecarError QUEUE_FULL / QUEUE_TIMEOUT / OVER_BUDGET.

        `sizes` are the pieces the allocator (if any) must find room for; `nbytes` is their total.
        """
        lease = self.try_acquire(nbytes, sizes)
        if lease is not None:
            return lease
        if self._draining:
            raise SidecarError(Cause.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)
        if len(self._waiters) >= self.max_queue:
            raise SidecarError(
                Cause.QUEUE_FULL,
                f"too many multimodal requests: {len(self._leases)} in progress and "
                f"{len(self._waiters)} queued (gate.max_queue={self.max_queue}); retry later",
            )
        waiter = _Waiter(nbytes, sizes, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._notify()
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                return await waiter.future
        except TimeoutError:
            self._abandon(waiter)
            raise SidecarError(
                Cause.QUEUE_TIMEOUT,
                f"waited {self.queue_timeout_s:g} s for a multimodal slot "
                f"(gate.queue_timeout_s={self.queue_timeout_s:g}); retry later",
            ) from None
        except BaseException:
            self._abandon(waiter)
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiter stops waiting (timeout, cancellation, shutdown). A grant that raced with it is
        handed straight back; otherwise it leaves the queue. Either way the next waiter may fit now."""
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release()
            return
        future.cancel()
        with contextlib.suppress(ValueError):  # already popped by _wake or close
            self._waiters.remove(waiter)
        self._wake()
        self._notify()

    def _check_admissible(self, nbytes: int) -> None:
        if self._closed:
            raise SidecarError(Cause.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)
        if nbytes > self.max_bytes:
            raise SidecarError(
                Cause.OVER_BUDGET,
                f"this request needs {nbytes} bytes of image memory, more than the whole budget "
                f"(gate.max_bytes={self.max_bytes}); send fewer or smaller images",
            )

    # -- release ---------------------------------------------------------------------------
    def _return(self, lease: Lease) -> None:
        del self._leases[lease.id]
        self._reserved -= lease.nbytes
        if self._allocator is not None and lease.memory is not None:
            self._allocator.free(lease.memory)
        self._wake()
        self._notify()

    def wake(self) -> None:
        """Memory came back outside a lease release (a deferred free): let waiters in."""
        self._wake()
        self._notify()

    def _wake(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():  # cancelled, about to leave the queue
                self._waiters.popleft()
                continue
            lease = self._try_grant(head.nbytes, head.sizes)
            if lease is None:
                return
            self._waiters.popleft()
            head.future.set_result(lease)

    def drain(self) -> int:
        """Shutdown has begun: fail every queued waiter with SHUTTING_DOWN now and queue nobody any more.

        A queued request would otherwise sit out the whole drain deadline and then be dropped without
        an answer; told now, its client retries on another replica at once. Held leases are untouched:
        their requests finish within the deadline. A request that finds a slot free is still admitted
        (it was accepted before shutdown and does not wait), one that would wait is refused. Returns
        how many waiters were failed.
        """
        self._draining = True
        return self._fail_waiters()

    def close(self) -> None:
        """Refuse new admissions and fail every queued waiter with SHUTTING_DOWN."""
        self._closed = True
        self._fail_waiters()

    def _fail_waiters(self) -> int:
        failed = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(SidecarError(Cause.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE))
                failed += 1
        self._notify()
        return failed
