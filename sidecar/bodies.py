"""The byte budget for request bodies held in memory, all requests together (`server.max_body_memory`).

The sidecar buffers each API request body (it must parse it, and may rewrite it) until the request
ends. Without a bound, a burst of large bodies is exactly the unbounded host memory the sidecar
exists to prevent, so bodies are admitted against a byte budget as they are read; a body that does
not fit is refused at once with 503 rather than queued (its bytes are already on the wire).

Two rules keep the budget honest and fair:
- a parsed body costs twice its size: the parsed tree, then the bytes that go to the engine (the
  raw bytes are dropped once parsed); parsed hollow (`hollow.py`), its bytes plus twice the JSON
  parsed (its base64 runs go upstream from the buffer), which is at most twice its size too;
- multimodal bodies, which wait at the gate for a lease (up to `gate.queue_timeout_s`), may hold at
  most `1 - server.text_body_share` of the budget: queued images can never starve text of memory.

While a body arrives, its `{`, `,` and `[` bytes are counted (strings included: an upper bound on its
objects and values): a body over `limits.max_json_objects` / `limits.max_json_items` is refused
before it is joined or parsed, since parsing it would hold the event loop for its whole size.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from aiohttp import web

from .errors import Cause, SidecarError


def _compiled_copy_count() -> Callable[[bytes, npt.NDArray[np.uint8] | None, int], tuple[int, int]] | None:
    try:
        from ._scan import copy_count  # noqa: PLC0415 - compiled (setup.py), optional
    except ImportError:
        return None  # the numpy path in _Structure.feed counts and copies the same
    return copy_count


_copy_count = _compiled_copy_count()


@dataclass(slots=True)
class BodyBudget:
    limit: int
    text_share: float = 0.25  # the part of `limit` multimodal bodies may never hold
    held: int = 0
    image_held: int = 0
    peak: int = field(default=0)

    @property
    def image_limit(self) -> int:
        return int(self.limit * (1 - self.text_share))

    def take(self, nbytes: int) -> None:
        if self.held + nbytes > self.limit:
            raise SidecarError(
                Cause.BODY_MEMORY_FULL,
                f"request bodies in memory would exceed server.max_body_memory={self.limit}; retry later",
            )
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def give(self, nbytes: int) -> None:
        self.held -= nbytes

    def charge(self) -> BodyCharge:
        return BodyCharge(self)


@dataclass(slots=True)
class BodyCharge:
    """One request's bytes in the budget; `release` (at the request's end) gives all of them back."""

    budget: BodyBudget
    nbytes: int = 0
    image: bool = False

    def take(self, nbytes: int) -> None:
        if self.image and self.budget.image_held + nbytes > self.budget.image_limit:
            raise self._images_full()
        self.budget.take(nbytes)
        self.nbytes += nbytes
        if self.image:
            self.budget.image_held += nbytes

    def mark_image(self) -> None:
        """This body is multimodal: from now on it counts against the images' share."""
        if self.image:
            return
        if self.budget.image_held + self.nbytes > self.budget.image_limit:
            raise self._images_full()
        self.image = True
        self.budget.image_held += self.nbytes

    def release(self) -> None:
        self.budget.give(self.nbytes)
        if self.image:
            self.budget.image_held -= self.nbytes
        self.nbytes = 0
        self.image = False

    def _images_full(self) -> SidecarError:
        return SidecarError(
            Cause.BODY_MEMORY_FULL,
            f"multimodal request bodies in memory would exceed their share of server.max_body_memory="
            f"{self.budget.limit} (1 - server.text_body_share={self.budget.text_share:g}); retry later",
        )


@dataclass(frozen=True, slots=True)
class JsonBounds:
    """How much JSON structure a body may carry (`limits.max_json_objects`, `limits.max_json_items`)."""

    max_objects: int
    max_items: int


class _Structure:
    """Running counts of `{` and of `,` and `[` over the chunks of one body."""

    __slots__ = ("bounds", "items", "objects")

    def __init__(self, bounds: JsonBounds) -> None:
        self.bounds = bounds
        self.objects = 0
        self.items = 0

    def feed(self, chunk: bytes, buf: npt.NDArray[np.uint8] | None = None, offset: int = 0) -> None:
        """Count `chunk`'s structure and, given `buf`, copy it there at `offset` (one pass where compiled)."""
        if _copy_count is not None:
            objects, items = _copy_count(chunk, buf, offset)
        else:
            # numpy's vectorized compares: a quarter of bytes.count's time (~0.4 against ~1.6 ms a MiB).
            a = np.frombuffer(chunk, np.uint8)
            objects = int(np.count_nonzero(a == 0x7B))  # {
            # Every array or member after the first needs a comma, every array a bracket (nesting bombs too).
            items = int(np.count_nonzero(a == 0x2C)) + int(np.count_nonzero(a == 0x5B))  # , [
            if buf is not None:
                buf[offset : offset + len(a)] = a
        self.objects += objects
        self.items += items
        if self.objects > self.bounds.max_objects:
            raise SidecarError(
                Cause.BODY_TOO_COMPLEX,
                f"request body has more than limits.max_json_objects={self.bounds.max_objects} JSON objects",
            )
        if self.items > self.bounds.max_items:
            raise SidecarError(
                Cause.BODY_TOO_COMPLEX,
                f"request body has more than limits.max_json_items={self.bounds.max_items} JSON values",
            )


def _small_pages(nbytes: int) -> npt.NDArray[np.uint8]:
    """An uninitialized buffer backed by 4 KiB pages, faulted in as the bytes arrive.

    Not `np.empty`: numpy advises the kernel to back arrays of 4 MiB and more with 2 MiB huge pages
    (MADV_HUGEPAGE), and where transparent huge pages are `madvise` (most distributions) the first
    touch of each 2 MiB then zeroes, and may compact, a whole huge page in one fault. Measured on the
    dev VM: every 2 MiB of a large body cost the loop one 2.6 ms step (31 ms of faults per 26 MiB),
    against 0.17 ms at most with small pages (9 ms in all). The mapping is unmapped when the last view
    of the buffer goes.
    """
    if nbytes == 0:
        return np.empty(0, np.uint8)
    memory = mmap.mmap(-1, nbytes)
    with contextlib.suppress(AttributeError, OSError):  # no MADV_NOHUGEPAGE off Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)  # where huge pages are `always` too
    return np.frombuffer(memory, np.uint8)


# Bytes of body processed between two turns of the event loop, at most: ~0.4 ms of loop time at
# ~1.5 ms a MiB (aiohttp's parser, the structure count, the copy). At 1 MiB, two hostile bodies
# read side by side made single loop turns of 3-4 ms, and the hostile mix's lag share above 5 ms
# was 0.9-3.4% over runs; at 256 KiB, 0.5-2.2%.
_YIELD_EVERY = 1 << 18


async def read_body(
    request: web.Request,
    charge: BodyCharge,
    max_body_bytes: int,
    timeout_s: float,
    bounds: JsonBounds | None = None,
) -> bytes | memoryview:
    """The whole body, size-capped, time-capped, structure-capped and charged to `charge`.

    The time cap is for slow clients (slow loris): a body that trickles in holds memory and a
    connection, so it gets `timeout_s` in all, not per chunk. The bytes stay charged until the
    caller's `charge.release()` at the request's end, whatever ends it.

    A body that arrives in chunks is copied into one buffer as it comes, allocated once,
    uninitialized (`_small_pages`: no page is touched before bytes arrive), never joined at the end.
    """
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise SidecarError(
            Cause.BODY_TOO_LARGE,
            f"request body is {request.content_length} bytes, more than server.max_body_bytes={max_body_bytes}",
        )
    structure = _Structure(bounds) if bounds is not None else None
    if request.content.is_eof() and request.content.total_bytes <= max_body_bytes:
        # Already all here (a small body arrives with its headers): no waiting, so no time cap.
        body = request.content.read_nowait()
        if structure is not None:
            structure.feed(body)
        charge.take(len(body))
        return body
    # Content-Length counts the bytes on the wire; a compressed body (aiohttp decodes it) is longer.
    # Without one (a chunked or compressed upload) the buffer spans server.max_body_bytes of address
    # space: only the pages the bytes reach are ever backed, so that costs no memory, and every body
    # is copied once, as it arrives (joining 25 MiB of chunks at the end held the loop ~4 ms).
    declared = request.content_length if "Content-Encoding" not in request.headers else None
    capacity = declared if declared is not None else max_body_bytes
    try:
        buf = _small_pages(capacity)
    except OSError:  # the address space refused (strict overcommit): like a full budget
        raise SidecarError(
            Cause.BODY_MEMORY_FULL, f"no memory for a request body of up to {capacity} bytes; retry later"
        ) from None
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_chunked(1 << 16):
                if received + len(chunk) > capacity:
                    raise SidecarError(
                        Cause.BODY_TOO_LARGE, f"request body is more than server.max_body_bytes={max_body_bytes} bytes"
                    )
                if structure is not None:
                    # counted and copied in one pass (a structure bomb is refused before its charge)
                    structure.feed(chunk, buf, received)
                else:
                    buf[received : received + len(chunk)] = np.frombuffer(chunk, np.uint8)
                charge.take(len(chunk))
                received += len(chunk)
                if received % _YIELD_EVERY < len(chunk):
                    # A fast client fills aiohttp's buffer faster than we drain it (7.5 MiB measured
                    # in one step), and reading what is buffered never suspends: let the loop run.
                    await asyncio.sleep(0)
    except TimeoutError:
        raise SidecarError(
            Cause.BODY_TIMEOUT, f"request body not received within server.body_timeout_s={timeout_s:g}"
        ) from None
    return memoryview(buf.data)[:received]
