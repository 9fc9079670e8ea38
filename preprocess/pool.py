"""A pool of spawn-started worker processes driven from an asyncio event loop, without threads for I/O.

Each worker owns one end of a `multiprocessing.Pipe`; the parent watches the other end and the
process's sentinel with `loop.add_reader`, so results and deaths arrive as event-loop callbacks.
Only the (possibly large) task send runs in a thread, so the loop never blocks on a full pipe.

Life of a task:

    queued --dispatch--> running --result--> settled (future resolved, on_settled called)
       |                    |--worker dies (kill -9, segfault, OOM)--> settled (WorkerCrashed), worker replaced
       |                    '--task_timeout_s--> worker killed --its death--> settled (TaskTimeout), replaced
       |--no worker ready, none starting--> failed (WorkerUnavailable; never sent)
       '--caller cancelled--> dropped (never sent; on_settled called at once)

Life of a worker: starting --"ready"--> ready (only now is it sent tasks) --death--> replaced at once.
A start that fails (the init raised, e.g. the processor does not load; the process died before it
said "ready"; or it was not ready within start_timeout_s) is retried after a delay that doubles
with each consecutive failure of that worker's slot, from `restart_backoff_s[0]` up to
`restart_backoff_s[1]`: a config that can never load costs one attempt per delay, not a tight
loop of process starts. While no worker is ready and none is starting, tasks fail at once with
`WorkerUnavailable` (the last start-up error in its message) instead of waiting for a start that
is not under way; tasks queued while one is starting wait for it, bounded by start_timeout_s.

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
# First and longest delay before starting a worker again after its slot's start-up failed.
_RESTART_BACKOFF_S = (0.5, 30.0)


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


class WorkerUnavailable(PoolError):
    """No worker is ready and none is starting: the last start-up failed and the next one waits out
    its back-off. Retryable: the next start may succeed."""


def restart_delay(failures: int, backoff_s: tuple[float, float] = _RESTART_BACKOFF_S) -> float:
    """Seconds to wait before the next start of a slot whose last `failures` (>= 1) starts failed."""
    first, longest = backoff_s
    return min(longest, first * 2.0 ** min(failures - 1, 64))  # the exponent capped: no float overflow


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
    ready: asyncio.Future[None]  # resolved by "ready"; failed by a start-up error or a death before it
    task: _Task[Any, Any] | None = None
    timer: asyncio.TimerHandle | None = None  # the running task's timeout, else the start-up timeout
    timed_out: bool = False
    dead: bool = False
    up: bool = False  # said "ready": the only state in which it is sent tasks
    start_error: str | None = None  # how its start-up failed ("failed to start: ...", "exited during ...")
    start_failures: int = 0  # consecutive start-up failures of its slot before it was started
    failure_counted: bool = False  # its start-up failure went into the stats and on_restart
    pid: int | None = field(default=None)


@dataclass(frozen=True, slots=True)
class WorkerPoolStats:
    workers: int  # processes alive, starting or ready
    busy: int
    queued: int
    restarts: int  # workers replaced, start-up failures included
    ready: int = 0
    start_failures: int = 0  # start-ups that failed, in total


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
        start_timeout_s: float = _START_TIMEOUT_S,
        restart_backoff_s: tuple[float, float] = _RESTART_BACKOFF_S,
    ) -> None:
        """`on_restart(reason)` is called once for every worker lost other than to close(): "timeout",
        "exit <code>" for one that died after it was ready (replaced at once), "start_failed" for one
        that never became ready (replaced after the back-off; before start() has returned, not at
        all: start() raises)."""
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if not 0 < restart_backoff_s[0] <= restart_backoff_s[1]:
            raise ValueError(f"restart_backoff_s must be (first, longest), 0 < first <= longest: {restart_backoff_s}")
        self._n = workers
        self._init = init
        self._job = job
        self._timeout = task_timeout_s
        self._on_restart = on_restart
        self._nice = nice
        self._start_timeout = start_timeout_s
        self._backoff = restart_backoff_s
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._queue: deque[_Task[T, R]] = deque()
        self._restarts = 0
        self._start_failures = 0
        self._start_error = ""  # how the last start-up failed, for WorkerUnavailable's message
        self._retries: list[asyncio.TimerHandle] = []  # slots waiting out their back-off
        self._started = False  # start() succeeded: from then on, failed start-ups are retried
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait until all are ready (each within start_timeout_s).

        Raises the first start-up failure (PoolError) at once, and retries nothing: a pool that
        cannot start is a configuration to fix, and is only fit to close.
        """
        self._loop = asyncio.get_running_loop()
        for _ in range(self._n):
            self._spawn()
        await asyncio.gather(*(w.ready for w in self._workers))
        self._started = True

    async def close(self) -> None:
        """Fail queued tasks, stop the workers (running tasks settle as their workers exit)."""
        self._closed = True
        for retry in self._retries:
            retry.cancel()
        self._retries.clear()
        while self._queue:
            task = self._queue.popleft()
            if not task.future.done():
                task.future.set_exception(PoolClosed("the preprocessing pool is shutting down"))
            task.settle()
        for w in list(self._workers):
            # Unregistered before it is closed: a closed pipe's fd can no longer be named, and a stale
            # registration would swallow the events of the next pipe that gets the same fd number
            # (a second pool in the same event loop never saw its workers' "ready").
            self._stop_reading(w)
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
            ready=sum(1 for w in self._workers if w.up and not w.dead),
            start_failures=self._start_failures,
        )

    def pids(self) -> list[int]:
        """Pids of the live workers, starting ones included."""
        return [w.pid for w in self._workers if w.pid is not None and not w.dead]

    def _unavailable(self) -> WorkerUnavailable | None:
        """The error for a task no worker can take: none is ready and none is starting."""
        if any(not w.dead for w in self._workers):
            return None
        retry = ""
        if self._retries and self._loop is not None:
            retry = f"; next start in {max(0.0, min(h.when() for h in self._retries) - self._loop.time()):.1f} s"
        return WorkerUnavailable(f"no preprocessing worker is running: the last worker {self._start_error}{retry}")

    # -- tasks -----------------------------------------------------------------------------
    async def run(self, payload: T, *, on_settled: Callable[[], None] | None = None) -> R:
        """Run `payload` in a worker. If the caller is cancelled while the task runs, the task
        still runs to its end and `on_settled` is called then (see the module docstring)."""
        refusal: PoolError | None = None
        if self._closed or self._loop is None:
            refusal = PoolClosed("the preprocessing pool is not running")
        else:
            refusal = self._unavailable()
        if refusal is not None:
            if on_settled is not None:  # nothing was sent: nothing can be writing for it
                on_settled()
            raise refusal
        assert self._loop is not None  # checked above
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
            # `up`, not `ready.done()`: a worker whose start-up failed has a done future too, and
            # a task sent to it would be lost with it.
            if w.task is None and not w.dead and w.up:
                task = self._queue.popleft()
                w.task = task
                assert self._loop is not None  # started
                w.timer = self._loop.call_later(self._timeout, self._on_timeout, w)
                self._loop.run_in_executor(None, _send, w.conn, task.payload)

    # -- events from the workers -----------------------------------------------------------
    def _spawn(self, start_failures: int = 0) -> None:
        assert self._loop is not None  # started
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child, self._init, self._job, self._nice), daemon=True)
        try:
            process.start()
        except BaseException:
            parent.close()
            child.close()
            raise
        child.close()
        w = _Worker(process, parent, self._loop.create_future(), start_failures=start_failures, pid=process.pid)
        w.ready.add_done_callback(_consume)  # a replacement's start-up failure is logged, not awaited
        w.timer = self._loop.call_later(self._start_timeout, self._on_start_timeout, w)
        self._workers.append(w)
        self._loop.add_reader(parent.fileno(), self._on_message, w)
        self._loop.add_reader(process.sentinel, self._on_exit, w)

    def _on_start_timeout(self, w: _Worker) -> None:
        if not w.up and not w.dead:
            w.start_error = f"was not ready within {self._start_timeout:g} s"
            log.warning("preprocessing worker %s %s; killing it", w.pid, w.start_error)
            w.process.kill()  # its death is a start-up failure like any other

    def _retry_start(self, start_failures: int) -> None:
        """Start a worker in a slot whose start-up failed, once its back-off is over."""
        assert self._loop is not None  # started

        def start() -> None:
            self._retries = [h for h in self._retries if h is not handle]
            if not self._closed:
                self._replace(start_failures)

        handle = self._loop.call_later(restart_delay(start_failures, self._backoff), start)
        self._retries.append(handle)

    def _replace(self, start_failures: int) -> None:
        """Start a worker in a lost worker's slot; a process that cannot even be created (no
        memory, no file descriptors, a process limit) is a start-up failure like the others."""
        try:
            self._spawn(start_failures)
        except OSError as exc:
            self._start_failures += 1
            self._start_error = f"could not be created ({exc})"
            failures = start_failures + 1
            log.warning(
                "preprocessing worker %s; %d start-up failure(s) in a row, next start in %.1f s",
                self._start_error,
                failures,
                restart_delay(failures, self._backoff),
            )
            if self._on_restart is not None:
                self._on_restart("start_failed")
            self._retry_start(failures)
            self._fail_queue_if_unavailable()

    def _on_message(self, w: _Worker) -> None:
        try:
            kind, value = w.conn.recv()
        except (EOFError, OSError):
            self._stop_reading(w)  # the sentinel reports the death
            return
        if kind == "ready":
            w.up = True
            if w.timer is not None:
                w.timer.cancel()  # the start-up timeout
                w.timer = None
            if not w.ready.done():
                w.ready.set_result(None)
            self._dispatch()
            return
        if kind == "init_error":
            # Counted now, even if the pool closes before the process is gone (start() raises this
            # at once); its death (the sentinel) schedules the retry.
            w.start_error = f"failed to start: {value}"
            self._count_start_failure(w)
            if not w.ready.done():
                w.ready.set_exception(PoolError(f"worker {w.start_error}"))
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
        if not w.up and w.start_error is None:
            w.start_error = f"exited during start-up (exit code {w.process.exitcode})"
        if not w.ready.done():
            w.ready.set_exception(PoolError(f"worker {w.start_error}"))
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
        if not w.up:
            # Never ready, so never given a task: nothing to settle, but starting again at once
            # would loop as fast as the failure repeats (a processor that cannot load fails every
            # time). Wait out a back-off that grows with each failure in a row.
            self._count_start_failure(w)
            failures = w.start_failures + 1
            if not self._started:
                return  # start() raises this failure; nothing is retried (see start)
            log.warning(
                "preprocessing worker %s %s; %d start-up failure(s) in a row, next start in %.1f s",
                w.pid,
                w.start_error,
                failures,
                restart_delay(failures, self._backoff),
            )
            self._retry_start(failures)
            self._fail_queue_if_unavailable()
            return
        reason = "timeout" if w.timed_out else f"exit {w.process.exitcode}"
        log.warning("preprocessing worker %s stopped (%s); starting a replacement", w.pid, reason)
        if self._on_restart is not None:
            self._on_restart(reason)
        self._replace(0)

    def _count_start_failure(self, w: _Worker) -> None:
        if w.failure_counted:
            return
        w.failure_counted = True
        self._start_failures += 1
        self._start_error = str(w.start_error)
        if self._on_restart is not None:
            self._on_restart("start_failed")

    def _fail_queue_if_unavailable(self) -> None:
        """Queued tasks were waiting for a worker that will not come before its back-off is over."""
        error = self._unavailable()
        if error is None:
            return
        while self._queue:
            task = self._queue.popleft()
            if not task.future.done():
                task.future.set_exception(error)
            task.settle()  # never sent: nothing can be writing for it

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
