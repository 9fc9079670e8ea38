"""The worker pool with real spawned processes: results, crashes, timeouts, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from preprocess.pool import PoolClosed, TaskFailed, TaskTimeout, WorkerCrashed, WorkerPool


def init_state() -> dict[str, int]:
    return {"pid": os.getpid()}


def job(state: dict[str, int], task: tuple[str, float, str]) -> tuple[int, str]:
    """`task` = (action, seconds, marker file): sleep, then do the action; touch the marker when done."""
    action, seconds, marker = task
    if seconds:
        time.sleep(seconds)
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise":
        raise ValueError("bad image")
    if marker:
        Path(marker).write_text("done")
    return state["pid"], action


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes once its state is Z.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


async def make_pool(
    workers: int = 2, timeout_s: float = 10.0
) -> WorkerPool[dict[str, int], tuple[str, float, str], tuple[int, str]]:
    pool: WorkerPool[dict[str, int], tuple[str, float, str], tuple[int, str]] = WorkerPool(
        workers=workers, init=init_state, job=job, task_timeout_s=timeout_s
    )
    await pool.start()
    return pool


async def test_tasks_run_in_separate_processes_in_parallel() -> None:
    pool = await make_pool(2)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(pool.run(("ok", 0.3, "")) for _ in range(2)))
        assert time.monotonic() - started < 0.55  # two 0.3 s jobs overlapped
        pids = {pid for pid, _ in results}
        assert len(pids) == 2 and os.getpid() not in pids
        assert set(pool.pids()) == pids
    finally:
        await pool.close()


async def test_kill_9_mid_task_fails_it_settles_after_death_and_replaces_the_worker() -> None:
    pool = await make_pool(1)
    try:
        (victim,) = pool.pids()
        settled_while_alive: list[bool] = []
        with pytest.raises(WorkerCrashed, match="died"):
            await pool.run(("crash", 0.05, ""), on_settled=lambda: settled_while_alive.append(alive(victim)))
        assert settled_while_alive == [False]
        assert pool.stats().restarts == 1 and pool.stats().workers == 1
        pid, action = await pool.run(("ok", 0, ""))
        assert action == "ok" and pid != victim
    finally:
        await pool.close()


async def test_external_kill_9_is_detected() -> None:
    pool = await make_pool(1)
    try:
        (victim,) = pool.pids()
        task = asyncio.create_task(pool.run(("ok", 5, "")))
        await asyncio.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerCrashed):
            await task
        assert (await pool.run(("ok", 0, "")))[1] == "ok"
    finally:
        await pool.close()


async def test_timeout_kills_the_worker_and_settles_after_death() -> None:
    pool = await make_pool(1, timeout_s=0.3)
    try:
        (victim,) = pool.pids()
        settled: list[bool] = []
        with pytest.raises(TaskTimeout, match=r"task_timeout_s=0\.3"):
            await pool.run(("ok", 30, ""), on_settled=lambda: settled.append(alive(victim)))
        assert settled == [False] and not alive(victim)
        assert pool.stats().restarts == 1
    finally:
        await pool.close()


async def test_a_job_that_raises_fails_only_its_task() -> None:
    pool = await make_pool(1)
    try:
        (pid,) = pool.pids()
        with pytest.raises(TaskFailed, match="ValueError: bad image"):
            await pool.run(("raise", 0, ""))
        assert pool.pids() == [pid] and pool.stats().restarts == 0
    finally:
        await pool.close()


async def test_cancel_while_queued_never_runs_and_settles_at_once(tmp_path: Path) -> None:
    pool = await make_pool(1)
    try:
        busy = asyncio.create_task(pool.run(("ok", 0.3, "")))
        await asyncio.sleep(0.05)
        marker = tmp_path / "queued"
        settled: list[int] = []
        queued = asyncio.create_task(pool.run(("ok", 0, str(marker)), on_settled=lambda: settled.append(1)))
        await asyncio.sleep(0.05)
        assert pool.stats().queued == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert settled == [1] and pool.stats().queued == 0
        await busy
        await asyncio.sleep(0.1)
        assert not marker.exists()
    finally:
        await pool.close()


async def test_cancel_while_running_settles_only_when_the_worker_is_done(tmp_path: Path) -> None:
    pool = await make_pool(1)
    try:
        marker = tmp_path / "running"
        settled: list[bool] = []
        running = asyncio.create_task(
            pool.run(("ok", 0.4, str(marker)), on_settled=lambda: settled.append(marker.exists()))
        )
        await asyncio.sleep(0.1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert settled == []  # the worker may still be writing
        async with asyncio.timeout(5):
            while not settled:
                await asyncio.sleep(0.01)
        assert settled == [True]  # settled after the worker finished its writes
    finally:
        await pool.close()


async def test_close_fails_queued_and_leaves_no_process() -> None:
    pool = await make_pool(1)
    pids = pool.pids()
    running = asyncio.create_task(pool.run(("ok", 5, "")))
    queued = asyncio.create_task(pool.run(("ok", 0, "")))
    await asyncio.sleep(0.1)
    await pool.close()
    for task in (running, queued):
        with pytest.raises(PoolClosed):
            await task
    assert not any(alive(p) for p in pids)
    with pytest.raises(PoolClosed):
        await pool.run(("ok", 0, ""))


async def test_workers_run_niced_as_batch_work_and_replacements_too() -> None:
    # The event loop must win a core its workers also want (see _worker_main); a replacement after a
    # crash must get the same treatment, not the parent's priority.
    pool: WorkerPool[dict[str, int], tuple[str, float, str], tuple[int, str]] = WorkerPool(
        workers=1, init=init_state, job=job, task_timeout_s=10.0, nice=7
    )
    await pool.start()
    try:
        base = os.getpriority(os.PRIO_PROCESS, 0)
        (first,) = pool.pids()
        assert os.getpriority(os.PRIO_PROCESS, first) == min(19, base + 7)
        assert os.sched_getscheduler(first) == os.SCHED_BATCH
        with pytest.raises(WorkerCrashed):
            await pool.run(("crash", 0.0, ""))
        second, _ = await pool.run(("ok", 0, ""))  # the replacement is up and has applied its setting
        assert second != first
        assert os.getpriority(os.PRIO_PROCESS, second) == min(19, base + 7)
        assert os.sched_getscheduler(second) == os.SCHED_BATCH
        assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the parent is untouched
    finally:
        await pool.close()


async def test_nice_zero_leaves_workers_as_the_parent() -> None:
    pool = await make_pool(1)
    try:
        (pid,) = pool.pids()
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0)
        assert os.sched_getscheduler(pid) == os.sched_getscheduler(0)
    finally:
        await pool.close()


async def test_a_task_refused_by_a_closed_pool_is_settled_at_once() -> None:
    # The caller frees the task's memory in on_settled: a refusal must call it, or the extent leaks.
    pool = await make_pool(1)
    await pool.close()
    settled: list[bool] = []
    with pytest.raises(PoolClosed):
        await pool.run(("ok", 0, ""), on_settled=lambda: settled.append(True))
    assert settled == [True]
