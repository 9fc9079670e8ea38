"""The arena's extent allocator: which page runs of the segment's data area are free, which reserved.

Allocation. Extents are runs of whole pages (the table has one entry per page, so two extents must
never share one). The free list is kept sorted by offset; `reserve` takes the best fit (the smallest
free run that is large enough, lowest offset on ties) so that small requests do not carve up the long
runs a 12-megapixel image needs; `release` (`Arena.free`) merges the run with both neighbours. An
extent holds all the tensors of one request at `TENSOR_ALIGN`-aligned offsets (`pack_tensors`), and
`reservation_size` is what that reservation really takes out of the budget, so admission can account
exactly.

This is bookkeeping only: `preprocess.arena.Arena` owns the segment, checks who may allocate, stamps
each reservation's generation and writes the page table. The allocator is not thread-safe: the owner
calls it from its event loop only.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .protocol import PAGE, TENSOR_ALIGN

__all__ = ["Extent", "ExtentAllocator", "pack_tensors", "reservation_size"]


@dataclass(frozen=True, slots=True)
class Extent:
    """A reservation: whole pages starting at `offset` (absolute, in the segment), stamped `generation`.

    Small and picklable: the owner sends it to the worker process that fills it.
    """

    shm: str
    offset: int
    capacity: int
    generation: int


def reservation_size(nbytes: int) -> int:
    """Bytes a reservation of `nbytes` payload bytes takes from the arena (whole pages, at least one)."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return max(1, -(-nbytes // PAGE)) * PAGE


def pack_tensors(sizes: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Offsets in one extent for tensors of `sizes` bytes, each TENSOR_ALIGN-aligned, and the payload total.

    ``reservation_size(total)`` is then the exact cost of the request's extent.
    """
    offsets: list[int] = []
    end = 0
    for n in sizes:
        if n < 0:
            raise ValueError(f"tensor sizes must be >= 0, got {n}")
        start = -(-end // TENSOR_ALIGN) * TENSOR_ALIGN
        offsets.append(start)
        end = start + n
    return tuple(offsets), end


class ExtentAllocator:
    """The free runs and the live extents of one segment's data area (see the module docstring)."""

    __slots__ = ("_free_lengths", "_free_starts", "_live", "_shm")

    def __init__(self, shm: str, start: int, length: int) -> None:
        """`length` bytes from `start` are free; an arena that does not own its segment passes 0."""
        self._shm = shm
        # Free runs, sorted by offset, as parallel lists so `bisect` works on the starts.
        self._free_starts: list[int] = [start] if length else []
        self._free_lengths: list[int] = [length] if length else []
        self._live: dict[int, Extent] = {}

    def reserve(self, need: int, generation: Callable[[], int]) -> Extent | None:
        """Take `need` bytes (a `reservation_size`) from the best-fitting free run; None when none is long enough.

        `generation()` stamps the extent. It is called only once a run is found and before anything
        changes, so it may raise.
        """
        best = -1
        for i, length in enumerate(self._free_lengths):
            if length >= need and (best < 0 or length < self._free_lengths[best]):
                best = i
                if length == need:
                    break
        if best < 0:
            return None
        stamp = generation()
        start = self._free_starts[best]
        if self._free_lengths[best] == need:
            del self._free_starts[best], self._free_lengths[best]
        else:
            self._free_starts[best] += need
            self._free_lengths[best] -= need
        extent = Extent(self._shm, start, need, stamp)
        self._live[start] = extent
        return extent

    def live(self, offset: int) -> Extent | None:
        """The live extent that starts at `offset`, if any."""
        return self._live.get(offset)

    def release(self, extent: Extent) -> None:
        """Return a live extent's pages to the free list, merging the run with both neighbours."""
        del self._live[extent.offset]
        start, length = extent.offset, extent.capacity
        i = bisect_left(self._free_starts, start)
        if i < len(self._free_starts) and self._free_starts[i] == start + length:
            length += self._free_lengths[i]
            del self._free_starts[i], self._free_lengths[i]
        if i > 0 and self._free_starts[i - 1] + self._free_lengths[i - 1] == start:
            self._free_lengths[i - 1] += length
        else:
            self._free_starts.insert(i, start)
            self._free_lengths.insert(i, length)

    def live_extents(self) -> tuple[Extent, ...]:
        return tuple(sorted(self._live.values(), key=lambda e: e.offset))

    def free_runs(self) -> tuple[tuple[int, int], ...]:
        """``(offset, length)`` of each free run, by offset."""
        return tuple(zip(self._free_starts, self._free_lengths, strict=True))

    @property
    def live_count(self) -> int:
        return len(self._live)

    @property
    def reserved_bytes(self) -> int:
        return sum(e.capacity for e in self._live.values())

    @property
    def free_bytes(self) -> int:
        return sum(self._free_lengths)

    @property
    def largest_free(self) -> int:
        return max(self._free_lengths, default=0)
