"""The sidecar's shared-memory arena: one segment, the extents reserved in it, and cleanup of stale segments.

The segment layout, the page generation table and the extent state machine are described in
`preprocess.protocol`, which readers import; this module is the writer's side.

Ownership. `Arena.create` makes the segment and owns it: only the owner reserves, publishes and
frees extents, and only the owner unlinks the segment on `close()`. Worker processes `Arena.attach`
the same segment read-write to fill extents the owner reserved for them (`ndarray_view`, `write`);
they never allocate and never unlink. Every descriptor either of them makes (`descriptor`, `write`)
is signed with the segment's key, which `create` draws at random and stores in the header page:
whoever maps the segment can sign, nobody else can. The segment is a plain file opened with
``O_CREAT | O_EXCL | O_NOFOLLOW``, never `multiprocessing.shared_memory`, whose resource tracker
unlinks segments when some unrelated process exits.

Memory is committed at creation: `posix_fallocate` reserves every page (a full tmpfs fails here,
with ENOSPC, instead of SIGBUS-ing a worker mid-request), then every page is pre-faulted, because
the first write into a fresh shm page is ~12x slower than into a mapped one.

Allocation. Which page runs are free and which reserved is `preprocess.extents` (best fit, merge on
free, what a reservation costs); the `Arena` around it checks that only the owner allocates, stamps
each reservation with a generation and moves its pages through the table's states. Neither is
thread-safe: the owner calls them from its event loop only.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .extents import Extent, ExtentAllocator, reservation_size
from .protocol import (
    DTYPES,
    GENERATION_BOUND,
    KEY_BYTES,
    NUMPY_DTYPES,
    PAGE,
    STATE_FREE,
    STATE_READY,
    STATE_WRITING,
    TENSOR_ALIGN,
    DescriptorError,
    SegmentHeader,
    TensorDescriptor,
    check_segment_name,
    segment_layout,
    table_entry,
)

__all__ = [
    "Arena",
    "ArenaError",
    "ArenaStats",
    "find_stale",
    "segment_name",
    "unlink_stale",
]

# Not in Python 3.11's mmap module; Linux >= 5.14. Faults pages in for writing without touching data.
_MADV_POPULATE_WRITE: Final = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# The kernel's ceiling for pid_max; anything larger in a header or a name is not a pid.
_PID_MAX: Final = 1 << 22
_DTYPE_NAMES: Final = {dt: name for name, dt in NUMPY_DTYPES.items() if name != "bfloat16"}
# Generations start below 2**60 and advance by 1 to 2**16 per reserve: at least 3 * 2**44 reserves
# (decades at 10^4 a second) before GENERATION_BOUND.
_GENERATION_START_BITS: Final = 60
_GENERATION_STRIDE: Final = 1 << 16


class ArenaError(RuntimeError):
    """The arena cannot do what was asked: no space at creation, a name taken, a double or foreign free,
    a write into an extent that is no longer writable. Retrying the same call will not help."""


@dataclass(frozen=True, slots=True)
class ArenaStats:
    """`size` is the segment, `capacity` its data area; reserved_bytes + free_bytes == capacity."""

    size: int
    capacity: int
    reserved_bytes: int
    free_bytes: int
    largest_free: int
    extents: int
    fragmentation: float


def segment_name(instance: str, pid: int | None = None) -> str:
    """``mm-sidecar-<instance>-<pid>``: the instance keeps sidecars apart, the pid tells a dead owner."""
    return check_segment_name(f"mm-sidecar-{instance}-{os.getpid() if pid is None else pid}")


class Arena:
    """One shared-memory segment and, in the owning process, its allocator. Build with `create` or `attach`."""

    def __init__(self, name: str, directory: str, mm: mmap.mmap, header: SegmentHeader, *, owner: bool) -> None:
        self._name = name
        self._directory = directory
        self._path = os.path.join(directory, name)
        self._mm: mmap.mmap | None = mm
        self._header = header
        self._owner = owner
        self._ident = _ident(self._path)
        self._table: npt.NDArray[np.uint64] | None = np.frombuffer(
            mm, dtype="<u8", count=header.pages, offset=header.table_offset
        )
        self._extents = ExtentAllocator(name, header.data_offset, header.pages * PAGE if owner else 0)
        # A random start and a random stride per reserve: strictly increasing, so never reused within
        # the segment, yet a live generation cannot be guessed from another one. (A segment re-created
        # under the same name has a new key, so its predecessor's descriptors fail the MAC anyway.)
        self._generation = secrets.randbits(_GENERATION_START_BITS)

    # ----------------------------------------------------------------------------- lifecycle

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        *,
        directory: str = "/dev/shm",
        pretouch: bool = True,
        replace_stale: bool = False,
    ) -> Arena:
        """Create and own the segment `directory/name` of `size` bytes (a multiple of 4096).

        An existing file of that name raises ArenaError, unless `replace_stale`: the caller has
        decided it is stale (see `find_stale`), and it is unlinked first.
        """
        check_segment_name(name)
        table_offset, pages, data_offset = segment_layout(size)
        path = os.path.join(directory, name)
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                if not replace_stale:
                    raise
                os.unlink(path)
                fd = os.open(path, flags, 0o600)
        except FileExistsError as exc:
            raise ArenaError(
                f"{path} already exists: another sidecar with this name is running, or a dead one left it "
                "(unlink_stale() removes those, replace_stale=True replaces it)"
            ) from exc
        except OSError as exc:
            raise ArenaError(f"cannot create arena {path}: {exc.strerror}") from exc
        mm: mmap.mmap | None = None
        try:
            _commit(fd, size, directory)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            if pretouch:
                _pretouch(mm, zero_fill=True)
            header = SegmentHeader(
                size=size,
                table_offset=table_offset,
                pages=pages,
                data_offset=data_offset,
                owner_pid=os.getpid(),
                owner_start=_start_ticks(os.getpid()) or 0,
                created_ns=time.time_ns(),
                boot_id=_boot_id(),
                # Readable by whoever can map the segment (0600: our uid), and by no one else.
                key=secrets.token_bytes(KEY_BYTES),
            )
            raw = header.pack()
            # Magic last: a reader that races the creation sees "not an arena", never half a header.
            mm[8 : len(raw)] = raw[8:]
            mm[0:8] = raw[:8]
            return cls(name, directory, mm, header, owner=True)
        except BaseException:
            if mm is not None:
                mm.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, name: str, directory: str = "/dev/shm", *, pretouch: bool = True) -> Arena:
        """Map an existing segment read-write without owning it (workers): no allocator, no unlink on close."""
        path = os.path.join(directory, check_segment_name(name))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ArenaError(f"cannot attach arena {path}: {exc.strerror}") from exc
        try:
            try:
                header = SegmentHeader.unpack(os.pread(fd, PAGE, 0), os.fstat(fd).st_size)
            except DescriptorError as exc:
                raise ArenaError(f"cannot attach arena {path}: {exc.detail}") from exc
            mm = mmap.mmap(fd, header.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if pretouch:
            # Page tables are per process: the owner's pre-faulting does not map pages here.
            _pretouch(mm, zero_fill=False)
        return cls(name, directory, mm, header, owner=False)

    def close(self) -> None:
        """Unmap; the owner also unlinks. Idempotent.

        Raises ArenaError, after doing both, if numpy views from `ndarray_view` are still alive: the
        mapping then lasts until the last of them is dropped.
        """
        if self._mm is None:
            return
        if self._owner and _ident(self._path) == self._ident:
            # Same file we created: a successor started with replace_stale must keep its segment.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        mm, self._mm, self._table = self._mm, None, None
        try:
            mm.close()
        except BufferError:
            raise ArenaError(f"arena {self._name}: views from ndarray_view() are still alive at close") from None

    def __enter__(self) -> Arena:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._header.size

    @property
    def capacity(self) -> int:
        """Bytes extents can take: the admission budget."""
        return self._header.pages * PAGE

    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def header(self) -> SegmentHeader:
        return self._header

    # ----------------------------------------------------------------------------- allocator

    def reserve(self, nbytes: int) -> Extent | None:
        """Reserve room for `nbytes` payload bytes, or None when no free run is long enough."""
        self._require_owner("reserve")
        extent = self._extents.reserve(reservation_size(nbytes), self._next_generation)
        if extent is not None:
            self._set_state(extent, STATE_WRITING)
        return extent

    def publish(self, extent: Extent, used_nbytes: int | None = None) -> None:
        """Mark the extent READY for readers; it can no longer be written.

        With `used_nbytes`, only the pages holding that payload become READY: a descriptor reaching
        beyond what was written is refused as "not published" rather than read.
        """
        self._require_live(extent, "publish")
        if self._state_of(extent) != table_entry(extent.generation, STATE_WRITING):
            raise ArenaError(f"extent at {extent.offset} (generation {extent.generation}) is already published")
        used = extent.capacity if used_nbytes is None else used_nbytes
        if not 0 <= used <= extent.capacity:
            raise ValueError(f"used_nbytes must be in [0, {extent.capacity}], got {used}")
        self._set_state(extent, STATE_READY, pages=max(1, -(-used // PAGE)))

    def free(self, extent: Extent) -> None:
        """Return the extent's pages to the free list (merging with neighbours) and mark them FREE."""
        self._require_live(extent, "free")
        self._set_state(extent, STATE_FREE)
        self._extents.release(extent)

    def live_extents(self) -> tuple[Extent, ...]:
        return self._extents.live_extents()

    def free_runs(self) -> tuple[tuple[int, int], ...]:
        """``(offset, length)`` of each free run, by offset."""
        return self._extents.free_runs()

    def stats(self) -> ArenaStats:
        free = self._extents.free_bytes
        largest = self._extents.largest_free
        return ArenaStats(
            size=self.size,
            capacity=self.capacity,
            reserved_bytes=self._extents.reserved_bytes,
            free_bytes=free,
            largest_free=largest,
            extents=self._extents.live_count,
            fragmentation=1 - largest / free if free else 0.0,
        )

    def leak_check(self) -> None:
        """Raise ArenaError naming the extents still reserved (tests call it at the end)."""
        live = self._extents.live_extents()
        if live:
            listed = ", ".join(f"{e.offset}+{e.capacity} (gen {e.generation})" for e in live)
            raise ArenaError(f"arena {self._name}: {len(live)} extents still reserved: {listed}")

    # ----------------------------------------------------------------------------- payload

    def ndarray_view(self, extent: Extent, offset: int, dtype: str, shape: Sequence[int]) -> npt.NDArray[Any]:
        """A writable numpy view at `offset` in the extent, for a worker to fill in place.

        bfloat16 is viewed as its uint16 bit patterns. Drop the view before `close()`.
        """
        desc = self.descriptor(extent, offset, dtype, shape)
        self._require_writable(extent)
        assert self._mm is not None  # _require_writable checked it
        flat = np.frombuffer(self._mm, dtype=NUMPY_DTYPES[dtype], count=desc.numel, offset=desc.offset)
        return flat.reshape(desc.shape)

    def write(self, extent: Extent, offset: int, array: npt.ArrayLike, *, dtype: str | None = None) -> TensorDescriptor:
        """Copy `array` into the extent at `offset` (a multiple of TENSOR_ALIGN) and return its descriptor.

        The dtype is taken from the array; pass ``dtype="bfloat16"`` with a uint16 array of bit patterns.
        """
        arr = np.asarray(array)
        name = _dtype_name(arr.dtype, dtype)
        view = self.ndarray_view(extent, offset, name, arr.shape)
        np.copyto(view, arr, casting="equiv")
        del view
        return self.descriptor(extent, offset, name, arr.shape)

    def descriptor(self, extent: Extent, offset: int, dtype: str, shape: Sequence[int]) -> TensorDescriptor:
        """The signed descriptor of a tensor at `offset` in the extent; ValueError if it does not fit there."""
        self._require_mine(extent)
        desc = TensorDescriptor(
            shm=self._name,
            offset=extent.offset + offset,
            nbytes=math.prod(shape) * DTYPES.get(dtype, 0),
            dtype=dtype,
            shape=tuple(int(d) for d in shape),
            generation=extent.generation,
            mac="",
        ).signed(self._header.key)
        try:
            desc.check()
        except DescriptorError as exc:
            raise ValueError(exc.detail) from None
        if offset < 0 or offset % TENSOR_ALIGN:
            raise ValueError(f"offset in extent must be a non-negative multiple of {TENSOR_ALIGN}, got {offset}")
        # An empty tensor still needs a page of the extent behind it, for readers to check the owner.
        if offset + max(desc.nbytes, 1) > extent.capacity:
            raise ValueError(f"{desc.nbytes} bytes at offset {offset} do not fit an extent of {extent.capacity}")
        return desc

    # ----------------------------------------------------------------------------- internals

    def _next_generation(self) -> int:
        """The stamp of the next reservation (see `__init__`); raises once the generations run out."""
        generation = self._generation + 1 + secrets.randbelow(_GENERATION_STRIDE)
        if generation >= GENERATION_BOUND:
            raise ArenaError(f"arena {self._name} has used up its generations: restart the sidecar")
        self._generation = generation
        return generation

    def _require_owner(self, what: str) -> None:
        if self._mm is None:
            raise ArenaError(f"arena {self._name} is closed")
        if not self._owner:
            raise ArenaError(f"{what}: only the process that created arena {self._name} allocates in it")

    def _require_mine(self, extent: Extent) -> None:
        if self._mm is None:
            raise ArenaError(f"arena {self._name} is closed")
        if extent.shm != self._name:
            raise ArenaError(f"extent belongs to arena {extent.shm!r}, not {self._name!r}")
        rel = extent.offset - self._header.data_offset
        if (
            rel < 0
            or rel % PAGE
            or extent.capacity <= 0
            or extent.capacity % PAGE
            or (extent.offset + extent.capacity > self._header.data_end)
        ):
            raise ArenaError(f"extent {extent.offset}+{extent.capacity} is not a page run of arena {self._name}")

    def _require_live(self, extent: Extent, what: str) -> None:
        self._require_owner(what)
        self._require_mine(extent)
        live = self._extents.live(extent.offset)
        if live is None:
            raise ArenaError(f"{what}: extent at {extent.offset} is not reserved (double free?)")
        if live != extent:
            raise ArenaError(
                f"{what}: extent at {extent.offset} generation {extent.generation} is stale; "
                f"the reservation there now is generation {live.generation} (double free?)"
            )

    def _require_writable(self, extent: Extent) -> None:
        # The table, not the owner's bookkeeping, decides: workers have only the table.
        self._require_mine(extent)
        if self._owner and self._extents.live(extent.offset) != extent:
            raise ArenaError(f"extent at {extent.offset} generation {extent.generation} is not reserved")
        # No named view of the table here: a traceback would keep it, and it pins the mapping.
        if not bool(np.all(self._pages(extent) == table_entry(extent.generation, STATE_WRITING))):
            raise ArenaError(
                f"extent at {extent.offset} generation {extent.generation} is no longer writable "
                "(published, freed or reused)"
            )

    def _pages(self, extent: Extent) -> npt.NDArray[np.uint64]:
        assert self._table is not None  # callers checked that the arena is open
        first = (extent.offset - self._header.data_offset) // PAGE
        return self._table[first : first + extent.capacity // PAGE]

    def _state_of(self, extent: Extent) -> int:
        return int(self._pages(extent)[0])

    def _set_state(self, extent: Extent, state: int, pages: int | None = None) -> None:
        table = self._pages(extent)
        table[: len(table) if pages is None else pages] = table_entry(extent.generation, state)


def _dtype_name(dt: np.dtype[Any], requested: str | None) -> str:
    if requested == "bfloat16":
        if dt.newbyteorder("<") != np.dtype("<u2"):
            raise ValueError(f"bfloat16 data must be given as uint16 bit patterns, got {dt}")
        return requested
    name = _DTYPE_NAMES.get(dt.newbyteorder("<"))
    if name is None:
        raise ValueError(f"dtype {dt} is not one of {', '.join(DTYPES)}")
    if requested is not None and requested != name:
        raise ValueError(f"array dtype {dt} does not match dtype={requested!r}")
    return name


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _free_space(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _commit(fd: int, size: int, directory: str) -> None:
    """Reserve every byte of the segment now, so that running out happens here and not as SIGBUS later."""
    free = _free_space(directory)
    # Checked first because a failing fallocate is not free: tmpfs allocates and zeroes pages until it
    # runs out and then gives them back, ext4 keeps the blocks until the file is unlinked; either way the
    # filesystem is full for a moment, and the engine shares it.
    if size > free:
        raise ArenaError(_no_space(size, directory, free))
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
            raise ArenaError(_no_space(size, directory, _free_space(directory), exc)) from exc
        raise ArenaError(f"cannot reserve {size} bytes in {directory}: {exc.strerror}") from exc


def _no_space(size: int, directory: str, free: int, exc: OSError | None = None) -> str:
    why = f" ({exc.strerror})" if exc is not None else ""
    return (
        f"arena of {size} bytes ({size / 2**20:.1f} MiB) does not fit in {directory}{why}: "
        f"{free} bytes ({free / 2**20:.1f} MiB) free. Lower the arena size or enlarge {directory} "
        "(tmpfs pages also count against the container's memory limit)"
    )


def _pretouch(mm: mmap.mmap, *, zero_fill: bool) -> None:
    """Fault every page in for writing now, so the first request does not pay for it."""
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except OSError:
        # Kernel older than 5.14. A fresh segment is all zeros, so writing a zero byte per page is
        # harmless; an attached one holds data other processes are writing, so leave it alone.
        if zero_fill:
            pages = np.frombuffer(mm, dtype=np.uint8)
            pages[:: mmap.PAGESIZE] = 0
            del pages


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().strip().replace(b"-", b"").decode())[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return bytes(16)


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), if readable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
        # Field 2 (comm) may hold spaces and parentheses: count fields after its last ')'.
        return int(text[text.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(pid: int, start: int | None, boot: bytes | None) -> bool:
    if boot is not None and boot != bytes(16) and boot != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A live pid may be a different process: containers restart as pid 1 again. Its start time
    # tells them apart; when either is unknown, assume alive (keeping a stale segment is the safe error).
    now = _start_ticks(pid)
    return not (start and now is not None and now != start)


def _segment_owner(path: str, name: str) -> tuple[int, int | None, bytes | None] | None:
    """``(pid, start ticks, boot id)`` from the header, else the pid at the end of the name, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        header = SegmentHeader.unpack(os.pread(fd, PAGE, 0), os.fstat(fd).st_size)
        if 0 < header.owner_pid <= _PID_MAX:
            return header.owner_pid, header.owner_start, header.boot_id
    except (OSError, DescriptorError):
        pass
    finally:
        os.close(fd)
    # No valid header: the owner died while creating it. The name still says who that was.
    tail = name.rsplit("-", 1)[-1]
    return (int(tail), None, None) if tail.isdigit() and 0 < int(tail) <= _PID_MAX else None


def find_stale(directory: str, prefix: str) -> list[str]:
    """Names in `directory` starting with `prefix` whose owning process is gone.

    The prefix must identify this sidecar instance (``segment_name(instance, pid)`` minus the pid): only
    segments of our own instance are judged, and files that are not recognisably ours are left alone.
    """
    stale = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
                continue
            owner = _segment_owner(entry.path, entry.name)
            if owner is not None and not _owner_alive(*owner):
                stale.append(entry.name)
    return sorted(stale)


def unlink_stale(directory: str, prefix: str) -> list[str]:
    """Unlink what `find_stale` finds; returns the names removed (a concurrent cleaner may win some)."""
    removed = []
    for name in find_stale(directory, prefix):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
            removed.append(name)
    return removed
