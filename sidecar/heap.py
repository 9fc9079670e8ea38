"""The garbage collector's pauses: freeze the start-up heap, and time every collection.

A collection holds the GIL for as long as it walks the objects of its generations, and the event
loop waits for it (whichever thread triggered it). A full (generation 2) collection walks every
tracked object: the ~52k that importing aiohttp, prometheus_client, numpy, PIL and yaml leaves took
12-20 ms each on the 2-core dev VM, on an otherwise idle sidecar. Under text traffic such
collections were most of the loop-lag samples above 5 ms that no CPU wait explained
(`bench/hostile_mix.py`'s `alone` variant).

`freeze_heap` runs once the app has started: it collects what start-up left as garbage, then
moves every surviving object to the collector's permanent generation (`gc.freeze`), which
collections skip. A full collection then walks only what requests made since: under 0.01 ms just
after the freeze on that VM. Only `serve` freezes (the sidecar's own process): a test process that
builds many apps would pin their objects for good.

`GcPauses` times every collection through `gc.callbacks` and hands the durations to the loop-lag
sampler, which observes them into `mm_sidecar_gc_pause_seconds`. The callback itself only appends
to a deque: observing a Prometheus metric takes that metric's lock, and a collection can start while
this thread holds it.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

__all__ = ["GcPauses", "freeze_heap"]


def freeze_heap() -> int:
    """Collect start-up's garbage, then exempt every live object from later collections; how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """Durations of the collections since the last `drain`, per generation (install / remove it)."""

    def __init__(self, keep: int = 4096) -> None:
        # Bounded: if nothing drains (a stalled sampler), the oldest pauses are dropped, not memory.
        self._pending: deque[tuple[int, float]] = deque(maxlen=keep)
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # Collections never overlap (each holds the GIL throughout), so one start time is enough.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pending.append((int(info["generation"]), time.perf_counter() - self._started))

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def drain(self) -> Iterator[tuple[int, float]]:
        """(generation, seconds) of each collection since the last call, oldest first."""
        pending = self._pending
        while pending:
            yield pending.popleft()
