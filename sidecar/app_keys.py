"""Typed keys for the state an app shares with its handlers (aiohttp `web.AppKey`)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.abc import AbstractResolver

from preprocess.pipeline import ImagePipeline
from preprocess.processors import ProcessorSpec

from .bodies import BodyBudget
from .config import Config
from .gate import SlotPool
from .metrics import Metrics
from .remote import RemoteImages
from .upstream import Upstream


@dataclass(slots=True)
class ServerState:
    """What shutdown needs: whether we are draining, and how many API requests are in flight."""

    draining: bool = False
    inflight: int = 0
    engine_verified: bool = False  # offload: the engine sees our /dev/shm
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set to shut the process down
    exit_code: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever inflight is 0

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
POOL = web.AppKey("pool", SlotPool)
UPSTREAM = web.AppKey("upstream", Upstream)
STATE = web.AppKey("state", ServerState)
HOLLOWER = web.AppKey("hollower", ThreadPoolExecutor)  # hollow.background_executor
BODIES = web.AppKey("bodies", BodyBudget)
SPEC = web.AppKey("spec", ProcessorSpec)  # present when preprocess.processor is set
REMOTE = web.AppKey("remote", RemoteImages)  # present when limits.allow_remote_urls is on
RESOLVER = web.AppKey("resolver", AbstractResolver)  # replaces DNS for remote fetches when present
PIPELINE = web.AppKey("pipeline", ImagePipeline)  # present in offload mode
