"""A rank's cache of host buffers that handed-off tensors are copied into.

Why: a tensor copied out of the arena into freshly allocated memory pays a page fault for every page
it writes. Large allocations come straight from `mmap` and go back to the kernel when freed, so every
request pays them again: 50 MB copied into a fresh tensor runs at 2.2 GB/s, into a reused one at
9.6 GB/s (bench/RESULTS.md, handoff). Serving engines keep their staging memory for the same reason
(torch's CachingHostAllocator caches the pinned buffers of host-to-device copies).

The pool hands out `Buffer`s (flat uint8 tensors, at least the size asked for) and takes them back
when the request's tensors are consumed or dropped. Rules:

* Sizes are rounded up to classes an eighth of a power of two apart (at least 64 KiB), and a request
  may get any free buffer of up to twice its size, so images of similar resolutions share buffers.
* Tensors under `min_bytes` (`image_grid_thw`, tiny images) are not pooled: small allocations come
  from the allocator's already-touched heap and would only fragment the pool.
* The pool never owns more than `cap_bytes`, held and free together. To make room for a new buffer it
  frees cached ones (largest first); when the buffers in use alone leave no room, the caller gets a
  plain tensor that is freed, not kept, when it is given back.
* A buffer comes back into circulation only when nothing else still shares its memory: `give`
  checks the storage's reference count, and a buffer some view still points at (a tensor the model
  kept, a traceback's frame) is forgotten instead, so it lives on with that view and is never
  handed to another request while in use.

Not thread-safe: a rank uses its pool only from the thread that executes its commands.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import torch

log = logging.getLogger("mm_engine.staging")

__all__ = ["DEFAULT_CAP_BYTES", "DEFAULT_MIN_BYTES", "Buffer", "StagingPool", "StagingStats"]

MiB: Final = 1 << 20
DEFAULT_CAP_BYTES: Final = 256 * MiB  # five 50 MB images (1080p at 12.8 MP) or ten at the default max_pixels
DEFAULT_MIN_BYTES: Final = 64 * 1024
_MAX_WASTE: Final = 2  # a free buffer serves a request of at least half its size


def _use_count(tensor: torch.Tensor) -> int | None:
    """How many references the tensor's storage has (None where torch does not say)."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    if counter is None:
        return None
    count: int = counter(tensor.untyped_storage()._cdata)
    return count


def size_class(nbytes: int, min_bytes: int = DEFAULT_MIN_BYTES) -> int:
    """`nbytes` rounded up to its class: a multiple of 1/8 of the power of two below it, >= `min_bytes`."""
    step = max(min_bytes, 1 << max(0, math.floor(math.log2(max(nbytes, 1))) - 3))
    return -(-max(nbytes, 1) // step) * step


@dataclass(eq=False, slots=True)
class Buffer:
    """A flat uint8 host tensor lent by a `StagingPool`; `view` shapes its first bytes as a tensor."""

    data: torch.Tensor
    pooled: bool
    # The storage's reference count while only the pool's `data` holds it (None: torch cannot say).
    _idle_count: int | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return int(self.data.numel())

    def view(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The buffer's first bytes as a contiguous tensor of `shape` and `dtype`."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.nbytes:
            raise ValueError(f"{nbytes} bytes of {dtype} {list(shape)} do not fit a {self.nbytes}-byte buffer")
        return self.data[:nbytes].view(dtype).view(shape)


@dataclass(frozen=True, slots=True)
class StagingStats:
    owned_bytes: int  # held + free pooled buffers: never above the cap
    free_bytes: int
    held: int  # pooled buffers lent out now
    hits: int  # takes served by a cached buffer
    misses: int  # takes that allocated a new pooled buffer
    unpooled: int  # takes served by a plain tensor: small, or no room under the cap
    evicted: int  # cached buffers freed to make room
    still_shared: int  # buffers given back while something still pointed into them: forgotten, not reused


class StagingPool:
    """Cached host buffers for one rank's tensor copies (see the module docstring)."""

    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES, *, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        if cap_bytes < 0 or min_bytes < 1:
            raise ValueError(f"staging pool: cap_bytes must be >= 0 and min_bytes >= 1, got {cap_bytes}, {min_bytes}")
        self.cap_bytes = cap_bytes
        self.min_bytes = min_bytes
        self._free: list[tuple[int, int, Buffer]] = []  # (size, tiebreak, buffer), ascending
        self._held: set[Buffer] = set()  # pooled buffers lent out (compared by identity)
        self._owned = 0
        self._free_bytes = 0
        self._serial = 0
        self._hits = self._misses = self._unpooled = self._evicted = self._still_shared = 0

    def take(self, nbytes: int) -> Buffer:
        """A buffer of at least `nbytes` bytes; hand it back with `give` once its tensors are dropped."""
        if nbytes < self.min_bytes:
            self._unpooled += 1
            return Buffer(torch.empty(nbytes, dtype=torch.uint8), pooled=False)
        i = bisect.bisect_left(self._free, (nbytes, -1))
        if i < len(self._free) and self._free[i][0] <= _MAX_WASTE * nbytes:
            buffer = self._free.pop(i)[2]
            self._free_bytes -= buffer.nbytes
            self._hits += 1
        else:
            size = size_class(nbytes, self.min_bytes)
            if not self._make_room(size):
                self._unpooled += 1
                return Buffer(torch.empty(nbytes, dtype=torch.uint8), pooled=False)
            # The caller's copy writes (and so faults in) the pages once; after that they stay warm.
            data = torch.empty(size, dtype=torch.uint8)
            buffer = Buffer(data, pooled=True, _idle_count=_use_count(data))
            self._owned += size
            self._misses += 1
        self._held.add(buffer)
        return buffer

    def give(self, buffers: Iterable[Buffer]) -> None:
        """Take buffers back. Call it after every tensor made from them is dropped."""
        for buffer in buffers:
            if not buffer.pooled:
                continue
            if buffer not in self._held:
                raise ValueError("staging pool: buffer given back twice or not lent by this pool")
            self._held.discard(buffer)
            count = _use_count(buffer.data)
            if count is not None and count != buffer._idle_count:
                # Something still points into it: reusing it would overwrite that tensor under its holder.
                # Forget it instead; it is freed with the last view.
                self._owned -= buffer.nbytes
                self._still_shared += 1
                log.warning("staging buffer of %d bytes still referenced when given back: not reused", buffer.nbytes)
                continue
            self._serial += 1
            bisect.insort(self._free, (buffer.nbytes, self._serial, buffer))
            self._free_bytes += buffer.nbytes

    def clear(self) -> None:
        """Free every cached buffer; buffers lent out now come back into the pool when given back."""
        self._owned -= self._free_bytes
        self._free_bytes = 0
        self._free.clear()

    def prefault(self, sizes: Iterable[int]) -> None:
        """Allocate and touch buffers for `sizes` now (engine start), so the first requests find them warm."""
        buffers = [self.take(n) for n in sizes]
        for buffer in buffers:
            buffer.data.fill_(0)
        self.give(buffers)

    @property
    def stats(self) -> StagingStats:
        return StagingStats(
            owned_bytes=self._owned,
            free_bytes=self._free_bytes,
            held=len(self._held),
            hits=self._hits,
            misses=self._misses,
            unpooled=self._unpooled,
            evicted=self._evicted,
            still_shared=self._still_shared,
        )

    def _make_room(self, size: int) -> bool:
        """Free cached buffers, largest first, until `size` more fits under the cap; False if it cannot."""
        if self._owned - self._free_bytes + size > self.cap_bytes:
            return False  # the buffers lent out leave no room: evicting the cached ones would not help
        while self._owned + size > self.cap_bytes and self._free:
            freed, _, _ = self._free.pop()
            self._owned -= freed
            self._free_bytes -= freed
            self._evicted += 1
        return self._owned + size <= self.cap_bytes
