"""A pool of spawn-started worker processes driven from an asyncio event loop, without threads for I/O.

Each worker owns one end of a `multiprocessing.Pipe`; the parent watches the other end and the
process's sentinel with `loop.add_reader`, so results and deaths arrive as event-loop callbacks.
Only the (possibly large) task send runs in a thread, so the loop never blocks on a full pipe.

Life of a task:

    queued --dispatch--> running --result--> settled (future resolved, on_settled called)
       |                    |--worker dies (kill -9, segfault, OOM)--> settled (WorkerCrashed), worker replaced
       |                    '--task_timeout_s--> worker killed --its death--> settled (TaskTimeout), replaced
       '--caller cancelled--> dropped (never sent; on_settled called at once)

`on_settled` is the moment no process can still write into the memory a task was given: the
worker answered, or it is dead (its sentinel fired). A caller that is cancelled while its task is
running does not get an answer, but its `on_settled` still runs later; that is where it frees the
arena extent the worker was writing into, never earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger("mm_sidecar.pool")

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

_START_TIMEOUT_S = 120.0  # importing transformers and loading a processor takes seconds, not minutes


class PoolError(RuntimeError):
    """A task the pool could not complete; `retryable` says whether the same task may succeed later."""

    retryable = True


class WorkerCrashed(PoolError):
    pass


class TaskTimeout(PoolError):
    pass


class TaskFailed(PoolError):
    """The job raised in the worker (bad input, usually): not retryable."""

    retryable = False


class PoolClosed(PoolError):
    pass


def _worker_main(
    conn: multiprocessing.connection.Connection, init: Callable[[], Any], job: Callable[..., Any], nice: int
) -> None:
    # The parent handles Ctrl-C and shuts workers down itself; a worker must not die of the
    # terminal's SIGINT while it is writing into an extent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice > 0:
        # Workers are batch work and the parent's event loop is latency work: when both want the
        # same core, the loop must win, or every request it serves (text included) waits behind a
        # JPEG decode. SCHED_BATCH also stops a worker's wake-up from preempting the loop.
        os.nice(nice)
        with contextlib.suppress(OSError, AttributeError):  # not Linux: niceness alone
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        state = init()
    except BaseException as exc:
        conn.send(("init_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone: exit rather than linger as an orphan
        try:
            result = job(state, task)
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", result))


@dataclass(eq=False)
class _Task(Generic[T, R]):
    payload: T
    future: asyncio.Future[R]
    on_settled: Callable[[], None] | None

    def settle(self) -> None:
        callback, self.on_settled = self.on_settled, None
        if callback is not None:
            callback()


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    ready: asyncio.Future[None]
    task: _Task[Any, Any] | None = None
    timer: asyncio.TimerHandle | None = None
    timed_out: bool = False
    dead: bool = False
    pid: int | None = field(default=None)


@dataclass(frozen=True, slots=True)
class WorkerPoolStats:
    workers: int
    busy: int
    queued: int
    restarts: int


class WorkerPool(Generic[S, T, R]):
    def __init__(
        self,
        *,
        workers: int,
        init: Callable[[], S],
        job: Callable[[S, T], R],
        task_timeout_s: float,
        on_restart: Callable[[str], None] | None = None,
        nice: int = 0,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._n = workers
        self._init = init
        self._job = job
        self._timeout = task_timeout_s
        self._on_restart = on_restart
        self._nice = nice
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._queue: deque[_Task[T, R]] = deque()
        self._restarts = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for _ in range(self._n):
            self._spawn()
        async with asyncio.timeout(_START_TIMEOUT_S):
            await asyncio.gather(*(w.ready for w in self._workers))

    async def close(self) -> None:
        """Fail queued tasks, stop the workers (running tasks settle as their workers exit)."""
        self._closed = True
        while self._queue:
            task = self._queue.popleft()
            if not task.future.done():
                task.future.set_exception(PoolClosed("the preprocessing pool is shutting down"))
            task.settle()
        for w in list(self._workers):
            with contextlib.suppress(OSError):
                w.conn.close()
            w.process.kill()
        for w in list(self._workers):
            await asyncio.to_thread(w.process.join, 5)
            self._on_exit(w)
        self._workers.clear()

    def stats(self) -> WorkerPoolStats:
        return WorkerPoolStats(
            workers=sum(1 for w in self._workers if not w.dead),
            busy=sum(1 for w in self._workers if w.task is not None),
            queued=len(self._queue),
            restarts=self._restarts,
        )

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None and not w.dead]

    # -- tasks -----------------------------------------------------------------------------
    async def run(self, payload: T, *, on_settled: Callable[[], None] | None = None) -> R:
        """Run `payload` in a worker. If the caller is cancelled while the task runs, the task
        still runs to its end and `on_settled` is called then (see the module docstring)."""
        if self._closed or self._loop is None:
            if on_settled is not None:  # nothing was sent: nothing can be writing for it
                on_settled()
            raise PoolClosed("the preprocessing pool is not running")
        task: _Task[T, R] = _Task(payload, self._loop.create_future(), on_settled)
        self._queue.append(task)
        self._dispatch()
        try:
            return await asyncio.shield(task.future)
        except asyncio.CancelledError:
            if task in self._queue:  # never sent: nothing can be writing for it
                self._queue.remove(task)
                task.future.cancel()
                task.settle()
            else:
                # Running: the answer is unwanted, but its exception must not go unretrieved.
                task.future.add_done_callback(_consume)
            raise

    def _dispatch(self) -> None:
        for w in self._workers:
            if not self._queue:
                return
            if w.task is None and not w.dead and w.ready.done():
                task = self._queue.popleft()
                w.task = task
                assert self._loop is not None  # started
                w.timer = self._loop.call_later(self._timeout, self._on_timeout, w)
                self._loop.run_in_executor(None, _send, w.conn, task.payload)

    # -- events from the workers -----------------------------------------------------------
    def _spawn(self) -> None:
        assert self._loop is not None  # started
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child, self._init, self._job, self._nice), daemon=True)
        process.start()
        child.close()
        w = _Worker(process, parent, self._loop.create_future(), pid=process.pid)
        w.ready.add_done_callback(_consume)  # a replacement's start-up failure is logged, not awaited
        self._workers.append(w)
        self._loop.add_reader(parent.fileno(), self._on_message, w)
        self._loop.add_reader(process.sentinel, self._on_exit, w)

    def _on_message(self, w: _Worker) -> None:
        try:
            kind, value = w.conn.recv()
        except (EOFError, OSError):
            self._stop_reading(w)  # the sentinel reports the death
            return
        if kind == "ready":
            if not w.ready.done():
                w.ready.set_result(None)
            self._dispatch()
            return
        if kind == "init_error":
            if not w.ready.done():
                w.ready.set_exception(PoolError(f"worker failed to start: {value}"))
            return
        task, w.task = w.task, None
        if w.timer is not None:
            w.timer.cancel()
        if task is not None:
            if not task.future.done():
                if kind == "ok":
                    task.future.set_result(value)
                else:
                    task.future.set_exception(TaskFailed(str(value)))
            task.settle()
        self._dispatch()

    def _on_timeout(self, w: _Worker) -> None:
        if w.task is not None and not w.dead:
            w.timed_out = True
            log.warning("worker %s exceeded task_timeout_s=%.1f; killing it", w.pid, self._timeout)
            w.process.kill()  # its death (sentinel) settles the task

    def _on_exit(self, w: _Worker) -> None:
        if w.dead:
            return
        w.dead = True
        self._stop_reading(w)
        if self._loop is not None:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(w.process.sentinel)
        if w.timer is not None:
            w.timer.cancel()
        # The sentinel fires when the kernel closes the dead process's files, after it has already
        # released its memory mappings (do_exit: exit_mm before exit_files), so it can no longer
        # write into the arena. Reaping it takes microseconds more; wait for that so that nothing
        # observes a not-yet-reaped pid after the task is settled.
        w.process.join(1.0)
        task, w.task = w.task, None
        if not w.ready.done():
            w.ready.set_exception(PoolError(f"worker exited during start-up (exit code {w.process.exitcode})"))
        if task is not None:
            if not task.future.done():
                if self._closed:
                    error: PoolError = PoolClosed("the preprocessing pool is shutting down")
                elif w.timed_out:
                    error = TaskTimeout(f"preprocessing took longer than preprocess.task_timeout_s={self._timeout:g}")
                else:
                    error = WorkerCrashed(f"the preprocessing worker died (exit code {w.process.exitcode})")
                task.future.set_exception(error)
            task.settle()  # the process is gone: nothing can write into the task's memory now
        if self._closed:
            return
        self._workers.remove(w)
        self._restarts += 1
        reason = "timeout" if w.timed_out else f"exit {w.process.exitcode}"
        log.warning("preprocessing worker %s stopped (%s); starting a replacement", w.pid, reason)
        if self._on_restart is not None:
            self._on_restart(reason)
        self._spawn()

    def _stop_reading(self, w: _Worker) -> None:
        if self._loop is not None:
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(w.conn.fileno())
        with contextlib.suppress(OSError):
            w.conn.close()


def _send(conn: multiprocessing.connection.Connection, payload: Any) -> None:
    # A worker killed mid-send breaks the pipe; its sentinel reports the death, nothing to do here.
    with contextlib.suppress(OSError, ValueError):
        conn.send(payload)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
