"""Prometheus metrics, base units, prefix `mm_sidecar_`, on a registry passed in (tests build many apps).

Workers and the engine do not write metrics: they report timings to the sidecar, which records them
here, so prometheus_client's multiprocess mode is never needed.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .gate import PoolStats

# Sub-millisecond proxy work up to multi-minute queues and generations.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.slots_in_use = Gauge(
            "mm_sidecar_slots_in_use", "Multimodal requests holding a gate slot", registry=registry
        )
        self.slots_capacity = Gauge("mm_sidecar_slots_capacity", "gate.max_concurrent", registry=registry)
        self.reserved_bytes = Gauge(
            "mm_sidecar_reserved_bytes", "Bytes reserved by admitted multimodal requests", registry=registry
        )
        self.capacity_bytes = Gauge("mm_sidecar_capacity_bytes", "gate.max_bytes", registry=registry)
        self.queue_depth = Gauge("mm_sidecar_queue_depth", "Multimodal requests waiting for a slot", registry=registry)
        self.queue_capacity = Gauge("mm_sidecar_queue_capacity", "gate.max_queue", registry=registry)
        self.inflight = Gauge("mm_sidecar_inflight_requests", "API requests being served", registry=registry)
        self.queue_wait = Histogram(
            "mm_sidecar_queue_wait_seconds",
            "Time a multimodal request waited for a slot (admitted or not)",
            buckets=_QUEUE_BUCKETS,
            registry=registry,
        )
        self.ack_latency = Histogram(
            "mm_sidecar_upstream_ack_seconds",
            "From forwarding a multimodal request to the engine's ack (slot released)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "mm_sidecar_request_duration_seconds",
            "End-to-end duration of API requests",
            ["family", "kind"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "mm_sidecar_requests",
            "API requests by route family, kind (text|multimodal) and outcome",
            ["family", "kind", "outcome"],
            registry=registry,
        )
        self.rejections = Counter(
            "mm_sidecar_rejections", "Requests refused by the sidecar, by reason", ["reason"], registry=registry
        )
        self.upstream_responses = Counter(
            "mm_sidecar_upstream_responses",
            "Engine responses by status class (2xx, 4xx, 5xx, error: no response)",
            ["status_class"],
            registry=registry,
        )
        self.fetch_seconds = Histogram(
            "mm_sidecar_fetch_seconds",
            "Fetching one remote image (all redirects)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.decode_seconds = Histogram(
            "mm_sidecar_decode_seconds", "Decoding one image in a worker", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.preprocess_seconds = Histogram(
            "mm_sidecar_preprocess_seconds",
            "One image in a worker from the decoded image to its tensors in the arena (fast path or processor)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        # One counter for every way a worker is lost, so the existing alert on any increase covers a
        # worker that cannot start too; reason "start_failed" tells it from crashes ("exit <code>")
        # and "timeout", and grows at most once per back-off delay (preprocess.pool).
        self.worker_restarts = Counter(
            "mm_sidecar_worker_restarts",
            "Preprocessing workers replaced, by reason: timeout, exit <code> (died after it was ready), "
            "start_failed (never became ready; retried after a growing back-off)",
            ["reason"],
            registry=registry,
        )
        self.arena_free_bytes = Gauge(
            "mm_sidecar_arena_largest_free_bytes", "Largest free run in the arena (offload mode)", registry=registry
        )
        # The sidecar and its workers; PSS splits the shared arena pages fairly (RSS counts them in each).
        self.tree_rss = Gauge(
            "mm_sidecar_process_tree_rss_bytes", "RSS of the sidecar and its worker processes", registry=registry
        )
        self.tree_pss = Gauge(
            "mm_sidecar_process_tree_pss_bytes", "PSS of the sidecar and its worker processes", registry=registry
        )
        # Set by a background sampler (app.py), not read at scrape time: reading smaps_rollup of a tree
        # that maps the arena takes tens of ms, which must not run on the event loop.
        self.loop_lag = Histogram(
            "mm_sidecar_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 10 ms): time text requests wait on it",
            # 1, 5 and 20 ms are bounds (text-latency targets, a stall worth an alert); up to 10 s, as
            # hostile bodies once blocked the loop for seconds.
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.loop_cpu_wait = Histogram(
            "mm_sidecar_event_loop_cpu_wait_seconds",
            "Time the event loop's thread was runnable but not running, per window of about 100 ms (Linux "
            "schedstat): lag with CPU wait means too little CPU for the sidecar, lag without it blocking code",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.gc_pause = Histogram(
            "mm_sidecar_gc_pause_seconds",
            "How long each garbage collection held the GIL, and so the event loop (sidecar process)",
            ["generation"],
            # A full collection of the unfrozen start-up heap took 12-20 ms on the dev VM (sidecar/heap.py).
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
            registry=registry,
        )
        self.gc_frozen = Gauge(
            "mm_sidecar_gc_frozen_objects",
            "Start-up objects exempted from garbage collection when the server started (gc.freeze)",
            registry=registry,
        )
        self.media_parts = Counter(
            "mm_sidecar_media_parts", "Media parts seen in admitted requests", ["media"], registry=registry
        )

    def pool_changed(self, stats: PoolStats) -> None:
        self.slots_in_use.set(stats.leases)
        self.reserved_bytes.set(stats.reserved_bytes)
        self.queue_depth.set(stats.queued)
        self.slots_capacity.set(stats.max_concurrent)
        self.capacity_bytes.set(stats.max_bytes)
        self.queue_capacity.set(stats.max_queue)

    def upstream_status(self, status: int | None) -> None:
        self._child(self.upstream_responses, "error" if status is None else f"{status // 100}xx").inc()

    def request_done(self, family: str, kind: str, outcome: str, seconds: float) -> None:
        self._child(self.requests, family, kind, outcome).inc()
        self._child(self.request_duration, family, kind).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        # `labels()` validates and locks on every call; on the text path that is a few microseconds
        # per request for the same handful of label sets, so keep the children.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
