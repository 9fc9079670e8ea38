"""`python -m bench.uvloop_serve ARGS`: `mm-sidecar ARGS`, unchanged, on uvloop's event loop.

The sidecar calls `asyncio.run`, which takes its loop from the event-loop policy: installing uvloop's
policy first is the whole change, made here so that the sidecar itself stays as it is.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from sidecar.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main())
