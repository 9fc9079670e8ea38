"""The worker pool with real spawned processes: results, crashes, timeouts, cancellation, shutdown,
and workers whose start-up fails (never sent a task, restarted with a growing back-off)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

import pytest

from preprocess.pool import (
    PoolClosed,
    PoolError,
    TaskFailed,
    TaskTimeout,
    WorkerCrashed,
    WorkerPool,
    WorkerUnavailable,
    restart_delay,
)


def init_state() -> dict[str, int]:
    return {"pid": os.getpid()}


def job(state: dict[str, int], task: tuple[str, float, str]) -> tuple[int, str]:
    """`task` = (action, seconds, marker file): sleep, then do the action; touch the marker when done."""
    action, seconds, marker = task
    if action == "until":  # hold the worker until the marker file exists (at most `seconds`)
        deadline = time.monotonic() + seconds
        while not Path(marker).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return state["pid"], action
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


# -- start-up failures ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Startup:
    """A worker init that does what the file `plan` in `directory` says when it runs.

    "ok" starts; "fail" raises (a processor that does not load); "fail-slowly" raises but keeps
    the process alive 3 s longer (a non-daemon thread), so that the pool hears the failure long
    before the process is gone; "hang" never finishes. Each attempt leaves `attempt-<pid>` with
    its monotonic start time (and its failure time), which the kernel's clock makes comparable
    across processes.
    """

    directory: str

    def plan(self, value: str) -> None:
        Path(self.directory, "plan").write_text(value)

    def attempts(self) -> list[tuple[int, float, float | None]]:
        """(pid, started, failed) of every attempt so far, in start order."""
        found = []
        for path in Path(self.directory).glob("attempt-*"):
            fields = path.read_text().split()
            if fields:
                failed = float(fields[1]) if len(fields) > 1 else None
                found.append((int(path.name.removeprefix("attempt-")), float(fields[0]), failed))
        return sorted(found, key=lambda attempt: attempt[1])

    def __call__(self) -> dict[str, int]:
        record = Path(self.directory, f"attempt-{os.getpid()}")
        record.write_text(f"{time.monotonic()!r}")
        plan = Path(self.directory, "plan").read_text()
        if plan == "hang":
            time.sleep(60)
        if plan in ("fail", "fail-slowly"):
            if plan == "fail-slowly":
                threading.Thread(target=time.sleep, args=(3,)).start()
            record.write_text(f"{record.read_text()} {time.monotonic()!r}")
            raise RuntimeError("cannot load the processor")
        return {"pid": os.getpid()}


async def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


Pool = WorkerPool[dict[str, int], tuple[str, float, str], tuple[int, str]]


def startup_pool(startup: Startup, reasons: list[str], workers: int = 1, **kwargs: Any) -> Pool:
    return WorkerPool(workers=workers, init=startup, job=job, task_timeout_s=30.0, on_restart=reasons.append, **kwargs)


def test_restart_delay_doubles_from_the_first_and_stops_at_the_longest() -> None:
    assert [restart_delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay(10_000) == 30  # no overflow however long the failures go on
    assert [restart_delay(n, (0.2, 1.0)) for n in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, 1.0]
    with pytest.raises(ValueError, match="restart_backoff_s"):
        WorkerPool(workers=1, init=init_state, job=job, task_timeout_s=1.0, restart_backoff_s=(2.0, 1.0))


async def test_failing_start_ups_back_off_and_tasks_fail_cleanly_meanwhile(tmp_path: Path) -> None:
    startup, reasons = Startup(str(tmp_path)), []
    startup.plan("ok")
    pool = startup_pool(startup, reasons, restart_backoff_s=(0.2, 10.0))
    await pool.start()
    try:
        startup.plan("fail")
        with pytest.raises(WorkerCrashed):
            await pool.run(("crash", 0, ""))
        # The replacement (at once: the worker it replaces was ready) and three retries fail.
        await wait_for(lambda: sum(failed is not None for _, _, failed in startup.attempts()) >= 4)
        attempts = startup.attempts()[1:]  # the first is the worker that started fine
        gaps = [nxt[1] - cur[2] for cur, nxt in itertools.pairwise(attempts) if cur[2] is not None]
        # Each retry starts no sooner than its delay after the failure before it: 0.2, 0.4, 0.8 s.
        for gap, delay in zip(gaps[:3], (0.2, 0.4, 0.8), strict=True):
            assert gap >= delay, (gaps, delay)
        assert reasons[:4] == ["exit -9", "start_failed", "start_failed", "start_failed"]

        # While the slot waits out its back-off, no worker can take a task: it fails at once with
        # the pool's error (and its memory is released at once), rather than waiting.
        await wait_for(lambda: pool.stats().workers == 0)
        assert pool.stats().ready == 0
        settled: list[bool] = []
        started = time.monotonic()
        with pytest.raises(WorkerUnavailable) as info:
            await pool.run(("ok", 0, ""), on_settled=lambda: settled.append(True))
        assert time.monotonic() - started < 0.5 and settled == [True]
        assert str(info.value).startswith(
            "no preprocessing worker is running: the last worker failed to start: "
            "RuntimeError: cannot load the processor; next start in "
        )
        assert info.value.retryable

        # Fixed: the next retry starts a worker that serves again; its slot's count starts over,
        # so the next failure after it waits the first delay again, not the fourth.
        startup.plan("ok")
        await wait_for(lambda: pool.stats().ready == 1)
        pid, _ = await pool.run(("ok", 0, ""))
        assert pid == pool.pids()[0]
        startup.plan("fail")
        failures = pool.stats().start_failures
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: pool.stats().start_failures >= failures + 2)
        last = startup.attempts()[-2:]
        assert last[0][2] is not None
        assert 0.2 <= last[1][1] - last[0][2] < 1.5  # the fourth delay would be 1.6 s
    finally:
        await pool.close()
    assert not any(alive(pid) for pid, _, _ in startup.attempts())


async def test_no_task_is_sent_to_a_worker_whose_start_up_failed(tmp_path: Path) -> None:
    startup, reasons = Startup(str(tmp_path)), []
    startup.plan("ok")
    pool = startup_pool(startup, reasons, workers=2, restart_backoff_s=(0.2, 1.0))
    await pool.start()
    gate = tmp_path / "gate"
    try:
        holding = asyncio.create_task(pool.run(("until", 30, str(gate))))  # the first worker, held
        await wait_for(lambda: pool.stats().busy == 1)
        startup.plan("fail-slowly")
        with pytest.raises(WorkerCrashed):
            await pool.run(("crash", 0, ""))  # the second worker; its replacement fails to start
        await wait_for(lambda: any(failed is not None for _, _, failed in startup.attempts()))
        await asyncio.sleep(0.3)  # the pool has heard the failure; the process lives on for 3 s
        failed_pid = startup.attempts()[-1][0]
        assert alive(failed_pid) and failed_pid in pool.pids()
        # A task now must wait for the held worker: the failed one would never read it.
        waiting = asyncio.create_task(pool.run(("ok", 0, "")))
        await asyncio.sleep(0.3)
        assert pool.stats().queued == 1 and not waiting.done()
        gate.write_text("go")
        held_pid, _ = await holding
        pid, action = await asyncio.wait_for(waiting, 10)
        assert (pid, action) == (held_pid, "ok")
        await wait_for(lambda: "start_failed" in reasons)
    finally:
        await pool.close()


async def test_a_worker_killed_during_start_up_fails_the_waiting_task(tmp_path: Path) -> None:
    startup, reasons = Startup(str(tmp_path)), []
    startup.plan("ok")
    pool = startup_pool(startup, reasons, restart_backoff_s=(0.2, 1.0))
    await pool.start()
    try:
        startup.plan("hang")
        with pytest.raises(WorkerCrashed):
            await pool.run(("crash", 0, ""))
        await wait_for(lambda: len(startup.attempts()) == 2)
        starting_pid = startup.attempts()[-1][0]
        # A task submitted while the replacement starts waits for it (it is not sent to it)...
        settled: list[bool] = []
        waiting = asyncio.create_task(pool.run(("ok", 0, ""), on_settled=lambda: settled.append(True)))
        await asyncio.sleep(0.2)
        assert pool.stats().queued == 1 and pool.stats().ready == 0
        # ...and when that start-up dies, fails with the pool's error instead of waiting forever.
        startup.plan("ok")
        os.kill(starting_pid, signal.SIGKILL)
        with pytest.raises(WorkerUnavailable, match=r"the last worker exited during start-up \(exit code -9\)"):
            await asyncio.wait_for(waiting, 10)
        assert settled == [True]
        assert reasons[:2] == ["exit -9", "start_failed"]
        await wait_for(lambda: pool.stats().ready == 1)  # after the back-off, a start that works
        assert (await pool.run(("ok", 0, "")))[1] == "ok"
    finally:
        await pool.close()


async def test_a_start_up_that_never_finishes_is_killed_and_refused(tmp_path: Path) -> None:
    startup, reasons = Startup(str(tmp_path)), []
    startup.plan("hang")
    pool = startup_pool(startup, reasons, start_timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(PoolError, match=r"^worker was not ready within 1\.5 s$"):
        await pool.start()
    assert time.monotonic() - started < 10
    try:
        # A pool that failed to start retries nothing and takes no task.
        await asyncio.sleep(0.3)
        assert len(startup.attempts()) == 1 and reasons == ["start_failed"]
        with pytest.raises(WorkerUnavailable, match=r"was not ready within 1\.5 s"):
            await pool.run(("ok", 0, ""))
    finally:
        await pool.close()
    assert not alive(startup.attempts()[0][0])


async def test_a_worker_that_cannot_even_be_created_is_retried_after_a_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    reasons: list[str] = []
    pool: Pool = WorkerPool(
        workers=1, init=init_state, job=job, task_timeout_s=10.0, on_restart=reasons.append, restart_backoff_s=(0.3, 1)
    )
    await pool.start()
    try:
        real_start = SpawnProcess.start
        refusals: list[float] = []

        def start_once_refused(process: SpawnProcess) -> None:
            if not refusals:
                refusals.append(time.monotonic())
                raise OSError(errno.EAGAIN, "Resource temporarily unavailable")  # fork at a process limit
            real_start(process)

        monkeypatch.setattr(SpawnProcess, "start", start_once_refused)
        with pytest.raises(WorkerCrashed):
            await pool.run(("crash", 0, ""))
        with pytest.raises(WorkerUnavailable) as info:
            await pool.run(("ok", 0, ""))
        assert str(info.value).startswith(
            "no preprocessing worker is running: the last worker could not be created "
            "([Errno 11] Resource temporarily unavailable); next start in "
        )
        await wait_for(lambda: pool.stats().ready == 1)
        assert (await pool.run(("ok", 0, "")))[1] == "ok"
        assert reasons == ["exit -9", "start_failed"] and pool.stats().start_failures == 1
    finally:
        await pool.close()
