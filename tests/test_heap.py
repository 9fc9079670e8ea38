"""The collector's pauses: timed per generation, and the start-up heap frozen out of them by `serve`."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.echo import EchoEngine
from sidecar.heap import GcPauses, freeze_heap

from .conftest import StackFactory
from .test_shutdown import run_sidecar


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture
def pauses() -> Iterator[GcPauses]:
    recorder = GcPauses()
    recorder.install()
    yield recorder
    recorder.remove()


def test_every_collection_is_timed_with_its_generation(pauses: GcPauses) -> None:
    list(pauses.drain())
    gc.collect(0)
    gc.collect(2)
    got = list(pauses.drain())
    assert [generation for generation, _ in got] == [0, 2]
    assert all(0 < seconds < 5 for _, seconds in got)
    assert list(pauses.drain()) == []  # drained once
    pauses.remove()
    gc.collect(2)
    assert list(pauses.drain()) == []  # removed: no longer called


def test_a_recorder_nobody_drains_keeps_only_its_last_pauses() -> None:
    recorder = GcPauses(keep=3)
    recorder.install()
    try:
        for _ in range(10):
            gc.collect(0)
    finally:
        recorder.remove()
    assert len(list(recorder.drain())) == 3


def test_freeze_frees_startup_garbage_and_exempts_the_rest() -> None:
    garbage, kept = Node(), Node()
    dead = weakref.ref(garbage)
    del garbage
    try:
        frozen = freeze_heap()
        now = gc.get_freeze_count()
        assert dead() is None  # collected first, not pinned for good
        # What freeze_heap reports is the permanent generation at the freeze. Objects leave it only
        # when freed, never join it: a thread an earlier test left running freed two in between once
        # (CI), so the count read after it may be a few lower, never higher.
        assert frozen > 1000 and frozen - 100 < now <= frozen, (frozen, now)
        assert not any(obj is kept for obj in gc.get_objects())  # in the permanent generation: never walked
        started = time.perf_counter()
        gc.collect(2)
        frozen_s = time.perf_counter() - started
    finally:
        gc.unfreeze()
    started = time.perf_counter()
    gc.collect(2)
    whole_s = time.perf_counter() - started
    # A test process holds hundreds of thousands of objects: walking them all is what the freeze spares.
    assert frozen_s < whole_s / 3, (frozen_s, whole_s)


async def test_an_apps_collections_show_in_its_metrics(stack: StackFactory) -> None:
    s = await stack()

    async def full_collections() -> float:
        text = await (await s.client.get("/metrics")).text()
        return metric(text, 'mm_sidecar_gc_pause_seconds_count{generation="2"}')

    before = await full_collections()
    gc.collect(2)
    gc.collect(2)
    async with asyncio.timeout(5):  # the 10 ms sampler moves them into the histogram
        while await full_collections() < before + 2:
            await asyncio.sleep(0.02)


async def test_the_served_sidecar_freezes_its_startup_heap(tmp_path: Path, aiohttp_server: Any) -> None:
    upstream = await aiohttp_server(EchoEngine(tokens=1).app())
    async with run_sidecar(tmp_path, str(upstream.make_url("")).rstrip("/")) as sc, aiohttp.ClientSession() as http:
        text = await (await http.get(sc.url + "/metrics")).text()
    # aiohttp, prometheus_client, numpy, PIL, yaml and the app: tens of thousands of objects.
    assert metric(text, "mm_sidecar_gc_frozen_objects") > 10_000
    assert 'mm_sidecar_gc_pause_seconds_bucket{generation="2",le="0.01"}' in text
