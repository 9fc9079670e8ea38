"""How long the calling thread has waited for a CPU: the second field of Linux's schedstat.

The event-loop lag histogram says the loop woke late, not why. Late with no CPU wait means code
blocked the loop (a bug to find); late with as much CPU wait means the loop was ready and the
kernel ran something else: the sidecar needs more CPU (its container's request, or fewer workers
than its cores), not a code change. Reading one small /proc file costs microseconds.
"""

from __future__ import annotations

_PATH = "/proc/thread-self/schedstat"


def run_queue_wait() -> float | None:
    """Seconds the calling thread has spent runnable but not running since it started (None: not Linux
    or schedstats unavailable)."""
    try:
        with open(_PATH, "rb") as f:
            fields = f.read().split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None
