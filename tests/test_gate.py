"""The slot pool: count and byte bounds, strict FIFO, bounded queue, timeouts, exactly-once release."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import Cause, SidecarError
from sidecar.gate import PoolStats, SlotPool


def pool(**kw: float) -> SlotPool:
    args: dict[str, float] = {"max_concurrent": 2, "max_bytes": 100, "max_queue": 8, "queue_timeout_s": 5.0}
    args.update(kw)
    return SlotPool(
        max_concurrent=int(args["max_concurrent"]),
        max_bytes=int(args["max_bytes"]),
        max_queue=int(args["max_queue"]),
        queue_timeout_s=args["queue_timeout_s"],
    )


async def test_count_bound_and_fifo_wakeup() -> None:
    p = pool()
    a, b = await p.acquire(1), await p.acquire(1)
    order: list[str] = []

    async def wait(name: str) -> None:
        lease = await p.acquire(1)
        order.append(name)
        lease.release()

    waiters = [asyncio.create_task(wait(n)) for n in "xyz"]
    await asyncio.sleep(0)
    assert p.stats().queued == 3 and p.stats().leases == 2
    a.release()
    b.release()
    await asyncio.gather(*waiters)
    assert order == ["x", "y", "z"]
    assert p.stats() == PoolStats(0, 0, 0, 2, 100, p.max_queue)


async def test_byte_bound_and_head_of_line_is_not_overtaken() -> None:
    p = pool(max_concurrent=10)
    big_holder = await p.acquire(60)
    big = asyncio.create_task(p.acquire(60))  # does not fit until big_holder leaves
    await asyncio.sleep(0)
    small = asyncio.create_task(p.acquire(10))  # would fit, but must not overtake `big`
    await asyncio.sleep(0.01)
    assert not big.done() and not small.done()
    assert p.stats().reserved_bytes == 60
    big_holder.release()
    lease_big = await big
    lease_small = await small
    assert p.stats().reserved_bytes == 70
    lease_big.release()
    lease_small.release()
    assert p.stats().reserved_bytes == 0


async def test_queue_full_is_refused_at_once() -> None:
    p = pool(max_concurrent=1, max_queue=1)
    held = await p.acquire(1)
    queued = asyncio.create_task(p.acquire(1))
    await asyncio.sleep(0)
    with pytest.raises(SidecarError) as info:
        await p.acquire(1)
    assert info.value.cause is Cause.QUEUE_FULL and "gate.max_queue=1" in info.value.message
    held.release()
    (await queued).release()
    assert p.stats().leases == 0


async def test_queue_timeout_leaves_the_queue() -> None:
    p = pool(max_concurrent=1, queue_timeout_s=0.05)
    held = await p.acquire(1)
    with pytest.raises(SidecarError) as info:
        await p.acquire(1)
    assert info.value.cause is Cause.QUEUE_TIMEOUT and "gate.queue_timeout_s=0.05" in info.value.message
    assert p.stats().queued == 0
    held.release()
    assert p.stats() == PoolStats(0, 0, 0, 1, 100, p.max_queue)


async def test_zero_queue_timeout_refuses_instead_of_waiting() -> None:
    p = pool(max_concurrent=1, queue_timeout_s=0)
    held = await p.acquire(1)
    with pytest.raises(SidecarError) as info:
        await p.acquire(1)
    assert info.value.cause is Cause.QUEUE_TIMEOUT
    held.release()


async def test_request_larger_than_budget_is_refused_not_queued() -> None:
    p = pool()
    with pytest.raises(SidecarError) as info:
        await p.acquire(101)
    assert info.value.cause is Cause.OVER_BUDGET
    assert "101 bytes" in info.value.message and "gate.max_bytes=100" in info.value.message
    assert p.stats().queued == 0


async def test_cancelled_waiter_leaves_queue_and_lets_next_in() -> None:
    p = pool(max_concurrent=1, max_bytes=100)
    held = await p.acquire(90)
    first = asyncio.create_task(p.acquire(50))
    await asyncio.sleep(0)
    second = asyncio.create_task(p.acquire(5))
    await asyncio.sleep(0)
    assert p.stats().queued == 2
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert p.stats().queued == 1
    held.release()
    lease = await second
    assert lease.nbytes == 5
    lease.release()
    assert p.stats() == PoolStats(0, 0, 0, 1, 100, p.max_queue)


async def test_grant_racing_with_cancellation_is_returned() -> None:
    p = pool(max_concurrent=1)
    held = await p.acquire(1)
    waiter = asyncio.create_task(p.acquire(1))
    await asyncio.sleep(0)
    held.release()  # grants the lease to `waiter`'s future...
    waiter.cancel()  # ...but the task is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert p.stats().leases == 0 and p.stats().reserved_bytes == 0


async def test_release_is_exactly_once() -> None:
    p = pool()
    lease = await p.acquire(10)
    assert lease.release() is True
    assert lease.release() is False
    with lease:
        pass
    assert p.stats().leases == 0 and p.stats().reserved_bytes == 0


async def test_close_fails_waiters_and_refuses_new() -> None:
    p = pool(max_concurrent=1)
    held = await p.acquire(1)
    waiter = asyncio.create_task(p.acquire(1))
    await asyncio.sleep(0)
    p.close()
    with pytest.raises(SidecarError) as info:
        await waiter
    assert info.value.cause is Cause.SHUTTING_DOWN
    with pytest.raises(SidecarError):
        await p.acquire(1)
    held.release()
    assert p.stats().leases == 0 and p.stats().queued == 0


async def test_on_change_reports_every_transition() -> None:
    seen: list[PoolStats] = []
    p = SlotPool(max_concurrent=1, max_bytes=10, max_queue=4, queue_timeout_s=5, on_change=seen.append)
    lease = await p.acquire(3)
    waiter = asyncio.create_task(p.acquire(4))
    await asyncio.sleep(0)
    lease.release()
    (await waiter).release()
    assert [(s.leases, s.reserved_bytes, s.queued) for s in seen] == [
        (1, 3, 0),
        (1, 3, 1),
        (1, 4, 0),  # release hands the slot straight to the waiter
        (0, 0, 0),
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["acquire", "release", "cancel"]), st.integers(0, 40)), min_size=1, max_size=40)
)
def test_random_schedules_keep_bounds_and_drain_to_zero(ops: list[tuple[str, int]]) -> None:
    async def run() -> None:
        p = pool(max_concurrent=3, max_bytes=50, max_queue=6, queue_timeout_s=5)
        tasks: list[asyncio.Task[object]] = []
        held = []
        for op, n in ops:
            if op == "acquire":
                tasks.append(asyncio.ensure_future(p.acquire(n)))
            elif op == "release" and held:
                held.pop(n % len(held)).release()
            elif op == "cancel" and tasks:
                tasks[n % len(tasks)].cancel()
            await asyncio.sleep(0)
            for t in [t for t in tasks if t.done()]:
                tasks.remove(t)
                if not t.cancelled() and t.exception() is None:
                    held.append(t.result())
            s = p.stats()
            assert s.leases <= 3 and s.reserved_bytes <= 50 and s.queued <= 6
        for lease in held:
            lease.release()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if hasattr(r, "release"):
                r.release()  # granted just before the cancel landed
        assert p.stats() == PoolStats(0, 0, 0, 3, 50, p.max_queue)

    asyncio.run(run())


class FakeArena:
    """An allocator with room for `slots` pieces; frees may be deferred like a worker still writing."""

    def __init__(self, slots: int) -> None:
        self.free_slots = slots
        self.deferred: list[tuple[int, ...]] = []
        self.defer = False

    def allocate(self, sizes: tuple[int, ...]) -> object | None:
        if len(sizes) > self.free_slots:
            return None
        self.free_slots -= len(sizes)
        return sizes

    def free(self, handle: object) -> None:
        assert isinstance(handle, tuple)
        if self.defer:
            self.deferred.append(handle)
        else:
            self.free_slots += len(handle)


async def test_allocator_backs_the_budget_and_deferred_frees_wake_waiters() -> None:
    arena = FakeArena(slots=2)
    p = SlotPool(max_concurrent=4, max_bytes=1000, max_queue=4, queue_timeout_s=5, allocator=arena)
    first = await p.acquire(20, (10, 10))
    assert first.memory == (10, 10) and arena.free_slots == 0
    # The byte budget has room, the allocator has not (fragmentation): the request waits.
    waiter = asyncio.create_task(p.acquire(10, (10,)))
    await asyncio.sleep(0.01)
    assert not waiter.done() and p.stats().queued == 1
    arena.defer = True
    first.release()  # lease gone, but a worker still writes: the memory is not back yet
    await asyncio.sleep(0.01)
    assert not waiter.done() and p.stats().leases == 0
    arena.free_slots += len(arena.deferred.pop())
    p.wake()  # the deferred free happened
    second = await waiter
    assert second.memory == (10,)
    arena.defer = False
    second.release()
    assert arena.free_slots == 2 and p.stats() == PoolStats(0, 0, 0, 4, 1000, p.max_queue)


async def test_drain_fails_waiters_at_once_and_keeps_held_leases() -> None:
    seen: list[PoolStats] = []
    p = SlotPool(max_concurrent=1, max_bytes=100, max_queue=8, queue_timeout_s=30, on_change=seen.append)
    held = await p.acquire(10)
    waiters = [asyncio.create_task(p.acquire(5)) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[1].cancel()  # a client that left: not counted, not failed twice
    await asyncio.sleep(0)
    assert p.stats().queued == 2
    assert p.drain() == 2
    for task in (waiters[0], waiters[2]):
        with pytest.raises(SidecarError) as info:
            await asyncio.wait_for(task, 0.1)  # at once, not at the 30 s queue timeout
        assert info.value.cause is Cause.SHUTTING_DOWN
        assert info.value.message == "the sidecar is shutting down; retry on another replica"
    assert (seen[-1].leases, seen[-1].queued) == (1, 0)
    # The held lease is untouched; a request that would have to wait is refused without queueing...
    assert not held.released and p.stats().leases == 1
    with pytest.raises(SidecarError) as info:
        await p.acquire(5)
    assert info.value.cause is Cause.SHUTTING_DOWN and p.stats().queued == 0
    # ...and one that finds a slot free is still admitted: it can finish within the deadline.
    held.release()
    lease = await asyncio.wait_for(p.acquire(5), 0.1)
    lease.release()
    # Teardown closes it for good.
    p.close()
    with pytest.raises(SidecarError):
        p.try_acquire(5)
    assert p.stats() == PoolStats(0, 0, 0, 1, 100, p.max_queue)
