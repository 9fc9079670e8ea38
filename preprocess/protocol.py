"""Tensor descriptors and the shared-memory reader: the one contract engines import.

The sidecar writes processor outputs (``pixel_values``, ``image_grid_thw``, ...) into one shared
memory segment per sidecar instance and sends the engine a ``TensorDescriptor`` per tensor. The
engine maps the segment read-only with ``ArenaReader``, checks the descriptor against the segment,
copies the tensor out and only then acks. This module imports only the standard library and numpy;
torch is imported inside the functions that return tensors, so adopting the contract costs nothing.

Threat model. A descriptor is a capability: whoever holds one makes the engine read that memory.

* Who can reach the engine's port: anything in the pod's network namespace (the sidecar, other
  containers of the pod, a debugging shell). Clients reach it only through the sidecar, which
  refuses ``image_tensors`` parts from clients; but the engine must not rely on that alone, since
  any neighbour can write a request by hand.
* Who can map the segment: processes of the sidecar's uid that see the same ``/dev/shm`` (the file
  is created 0600; the reader refuses a segment that grants group or other any access). They can
  read every tensor in it anyway, so they are inside the trust boundary: the key below lives in the
  segment and is theirs to read.
* What the MAC proves: ``mac`` is HMAC-SHA256, under a random 32-byte key that the creator writes
  into the segment's header page, of a canonical encoding of the six other fields. A descriptor
  that verifies was issued by the sidecar owning this segment, for exactly this extent and these
  tensors (offset, size, dtype, shape, generation). Anyone who cannot map the segment cannot make
  one, and cannot reuse one for other memory: changing any field breaks it, and a segment
  re-created under the same name has a new key, so its predecessor's descriptors fail too.
* What it does not prove: that the sender is the sidecar. A genuine descriptor replayed by someone
  who saw it reads that extent as long as it is live; the generation check bounds this: once the
  sidecar frees the extent (after the engine's ack) or reuses any of its pages, the replay is stale.
  Descriptors travel only between the sidecar and the engine, so seeing one already means being
  inside the pod with the power to read its traffic.
* What a refusal tells the sender: nothing. Every bad, stale or forged descriptor raises
  `DescriptorError` (or `StaleDescriptor`) whose ``str()`` is the one fixed message
  `DESCRIPTOR_ERROR`; the cause (bounds of the data area, whether a segment exists, page
  generations and states, the bytes of some other file) is on ``.detail``, for the engine's log.
  An engine answers a refusal with that fixed message only.
* What is never opened: names without the ``mm-sidecar-`` prefix, names that could leave the
  segment directory, symlinks (``O_NOFOLLOW``), anything that is not a regular file; files are
  opened ``O_NONBLOCK``, so a FIFO planted under a segment's name cannot stall the reader.

Segment layout (format version 2, little-endian, offsets in bytes from the start of the segment)::

    0          4096                    data_offset                              data_end   size
    | header   | generation table      | data area: `pages` pages of 4096 bytes  | slack  |
    | page     | pages x u64, rounded  |                                          | <= 1pg |
    |          | up to whole pages     |                                          |        |

    header   0  8s  magic         b"MMSCARN1" (written last: a half-made header never validates)
             8  u32 version       2 (readers refuse every other version)
            12  u32 page          4096, the granule of the table and of extent alignment
            16  u64 size          segment bytes, equal to the file size
            24  u64 table_offset  4096
            32  u64 pages         data pages = table entries
            40  u64 data_offset   table_offset + table bytes
            48  u64 owner_pid     pid of the creating sidecar (pid namespace of the creator)
            56  u64 owner_start   its start time in clock ticks since boot (/proc/<pid>/stat #22)
            64  u64 created_ns    time.time_ns() at creation (informational)
            72  16s boot_id       /proc/sys/kernel/random/boot_id of the creator
            88  u32 tensor_align  64: every tensor starts on a multiple of it
            92  32s key           the descriptors' HMAC-SHA256 key, secrets.token_bytes(32)

Table entry ``i`` describes data page ``i`` (bytes ``data_offset + i*4096`` to ``+4096``) and holds
``generation << 2 | state``. All pages of one extent move together, and only the creating process
writes entries::

                     reserve: generation = counter += random stride
        FREE(g_old) ------------------------------> WRITING(g) ---- free (abort) ----> FREE(g)
                                                        |
                                                        | publish (payload written; with used_nbytes,
                                                        v          only the pages holding it)
                                                     READY(g) ------ free (after the ack) --> FREE(g)

A descriptor ``(offset, nbytes, generation g)`` may be read if and only if its MAC verifies under
the segment's key and every page that ``[offset, offset + nbytes)`` touches holds ``g << 2 | READY``.
``ArenaReader`` checks both before it makes a view, and the pages again after ``copy_out`` has
copied. Each reserve hands out a generation never used before in the segment and stamps it on every
page it takes, so any reuse of any byte of a freed extent, wherever the new extent begins, changes
an entry that the old descriptor's check reads: stale descriptors are detected, never silently read.
``free`` bumps nothing; the next reserve does. The counter starts at a random value (below 2**60)
and each reserve advances it by a random stride of 1 to 2**16, so generations strictly increase
within a segment yet cannot be predicted from one another (the bound 2**62 is then ~2**45 reserves
away). A segment re-created under the same name (a restarted container gets the same pid) has a new
key: descriptors of its predecessor fail the MAC whatever generation they carry.

Why a per-page table and not a header in front of each extent: one extent holds several tensors
(``pixel_values``, then ``image_grid_thw`` at an aligned sub-offset), so a tensor's offset does not say
where its extent begins; and after free, coalescing and a new reserve, the old extent's header would lie
inside another request's payload. The table answers "who owns this byte now" for any offset at a cost
of 8 bytes per 4 KiB page (0.2 %). It is also why extents are page-aligned: two extents never share a
page, so one entry never has two owners.

Lifetime rules:

* Only the creator unlinks the segment; readers open it ``O_RDONLY | O_NOFOLLOW | O_NONBLOCK`` and
  map it ``PROT_READ``. Python's ``multiprocessing`` resource tracker is never involved.
* The sidecar publishes an extent before it sends the descriptor; the HTTP request carrying the
  descriptor orders the stores before the engine's reads (its send and receive are syscalls).
  Table entries are aligned 8-byte words, so a reader never sees a torn entry.
* A reader must drop every view and tensor into the segment before it acks: after the ack the
  sidecar frees the extent and the next reserve overwrites it, and a view kept past that point would
  show another request's pixels. Views keep the mapping alive (no dangling memory), and
  ``ArenaReader.close()`` reports views that outlive it.
"""

from __future__ import annotations

import hmac
import json
import math
import mmap
import os
import re
import stat
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "DESCRIPTOR_ERROR",
    "DTYPES",
    "GENERATION_BOUND",
    "KEY_BYTES",
    "MAGIC",
    "NUMPY_DTYPES",
    "PAGE",
    "SEGMENT_PREFIX",
    "STATE_FREE",
    "STATE_READY",
    "STATE_WRITING",
    "TENSOR_ALIGN",
    "VERSION",
    "ArenaReader",
    "DescriptorError",
    "ImageNormalization",
    "SegmentHeader",
    "StaleDescriptor",
    "TensorDescriptor",
    "check_normalize",
    "check_segment_name",
    "descriptor_mac",
    "segment_layout",
    "table_entry",
]

MAGIC: Final = b"MMSCARN1"
VERSION: Final = 2
# What str() of every DescriptorError says, whatever the cause: engines relay it to clients.
DESCRIPTOR_ERROR: Final = "invalid or stale tensor descriptor"
SEGMENT_PREFIX: Final = "mm-sidecar-"
GENERATION_BOUND: Final = 1 << 62
KEY_BYTES: Final = 32
PAGE: Final = 4096
TENSOR_ALIGN: Final = 64
STATE_FREE: Final = 0
STATE_WRITING: Final = 1
STATE_READY: Final = 2
_STATE_BITS: Final = 2
_STATE_NAMES: Final = ("free", "writing", "ready", "invalid")
_U63: Final = 1 << 63
_MAX_NDIM: Final = 32
_HEADER = struct.Struct(f"<8sIIQQQQQQQ16sI{KEY_BYTES}s")

# Item size per accepted dtype. Little-endian everywhere: the segment is a wire format.
DTYPES: Final[Mapping[str, int]] = MappingProxyType(
    {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}
)
# numpy has no bfloat16: its bit patterns travel as uint16 and torch reinterprets them.
NUMPY_DTYPES: Final[Mapping[str, np.dtype[Any]]] = MappingProxyType(
    {
        "float32": np.dtype("<f4"),
        "float16": np.dtype("<f2"),
        "bfloat16": np.dtype("<u2"),
        "int64": np.dtype("<i8"),
        "int32": np.dtype("<i4"),
        "uint8": np.dtype("u1"),
        "bool": np.dtype("?"),
    }
)
# The prefix keeps readers away from every other file in /dev/shm; no "/" means no leaving it.
_NAME_RE: Final = re.compile(re.escape(SEGMENT_PREFIX) + f"[A-Za-z0-9_.-]{{1,{255 - len(SEGMENT_PREFIX)}}}")
_MAC_RE: Final = re.compile(r"[0-9a-f]{64}")
_FIELDS: Final = ("shm", "offset", "nbytes", "dtype", "shape", "generation", "mac")
# Domain separation: these bytes are signed for nothing else, and a future format signs other ones.
_MAC_CONTEXT: Final = b"mm-sidecar tensor descriptor v2\n"


class DescriptorError(ValueError):
    """A descriptor that must not be read: malformed, forged, out of bounds, unknown segment, not published.

    ``str()`` is always `DESCRIPTOR_ERROR`, whatever the cause: engines relay it to clients, and the
    cause describes the arena (its bounds, segment names, generations, page states, other files).
    `detail` says what was wrong, for the engine's log. Retrying the same descriptor cannot help;
    the request it belongs to must be rejected.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(DESCRIPTOR_ERROR)
        self.detail = detail

    def __str__(self) -> str:
        return DESCRIPTOR_ERROR

    def __reduce__(self) -> tuple[type[DescriptorError], tuple[str]]:
        # The default pickles args, the fixed message: keep the detail across processes.
        return type(self), (self.detail,)


class StaleDescriptor(DescriptorError):
    """The descriptor's extent was freed or reused (before or while it was read), or its segment is gone.

    The sidecar has given up on the request (ack timeout, shutdown); the data is not the request's any more.
    Same fixed ``str()`` as every DescriptorError; the class is for callers and tests that care why.
    """


def check_segment_name(name: str) -> str:
    """Return `name` if it is a segment's name (``mm-sidecar-...``, a plain file name), else raise ValueError.

    Descriptors carry the segment name from the network, so it must never be able to leave the
    segment directory ("../", "/") nor name any file that is not one of this project's segments.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"segment name must be {SEGMENT_PREFIX!r} then 1-{255 - len(SEGMENT_PREFIX)} of [A-Za-z0-9_.-], "
            f"got {name!r:.80}"
        )
    return name


def descriptor_mac(  # noqa: PLR0917 - the six fields a MAC covers, no more, no fewer
    key: bytes, shm: str, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...], generation: int
) -> str:
    """Hex HMAC-SHA256 under `key` of the canonical encoding of the six fields of a descriptor.

    The encoding is injective: strings are length-prefixed, integers are decimal (one spelling
    each), the shape is prefixed with its length, so two different descriptors never sign the same
    bytes.
    """
    dims = ",".join(map(str, shape))
    text = f"{len(shm)}:{shm}\n{offset}\n{nbytes}\n{len(dtype)}:{dtype}\n{len(shape)}:{dims}\n{generation}"
    return hmac.digest(key, _MAC_CONTEXT + text.encode("utf-8", "surrogatepass"), "sha256").hex()


def table_entry(generation: int, state: int) -> int:
    """The table word for a page owned by `generation` in `state`."""
    return generation << _STATE_BITS | state


def segment_layout(size: int) -> tuple[int, int, int]:
    """``(table_offset, pages, data_offset)`` for a segment of `size` bytes (a multiple of PAGE, >= 3 pages)."""
    if size < 3 * PAGE or size % PAGE:
        raise ValueError(f"arena size must be a multiple of {PAGE} and at least {3 * PAGE} bytes, got {size}")
    # Each data page costs PAGE bytes plus an 8-byte entry; start from that estimate and step down
    # until the page-rounded table fits as well.
    pages = (size - PAGE) // (PAGE + 8)
    while PAGE + _round_up(8 * pages, PAGE) + pages * PAGE > size:
        pages -= 1
    return PAGE, pages, PAGE + _round_up(8 * pages, PAGE)


def segment_size_for(capacity: int) -> int:
    """The smallest segment whose data pages hold `capacity` bytes: what a budget of `capacity` maps."""
    pages = max(1, _round_up(capacity, PAGE) // PAGE)
    size = PAGE + _round_up(8 * pages, PAGE) + pages * PAGE
    assert segment_layout(size)[1] >= pages
    return size


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The segment's first page (see the module docstring for the byte layout)."""

    size: int
    table_offset: int
    pages: int
    data_offset: int
    owner_pid: int
    owner_start: int
    created_ns: int
    boot_id: bytes
    # Never in a repr: headers end up in logs and tracebacks.
    key: bytes = field(repr=False)
    version: int = VERSION
    page: int = PAGE
    tensor_align: int = TENSOR_ALIGN

    @property
    def data_end(self) -> int:
        return self.data_offset + self.pages * PAGE

    def pack(self) -> bytes:
        """The header bytes, magic first; the writer stores the magic last."""
        return _HEADER.pack(
            MAGIC,
            self.version,
            self.page,
            self.size,
            self.table_offset,
            self.pages,
            self.data_offset,
            self.owner_pid,
            self.owner_start,
            self.created_ns,
            self.boot_id,
            self.tensor_align,
            self.key,
        )

    @classmethod
    def unpack(cls, data: bytes, file_size: int) -> SegmentHeader:
        """Parse and validate a header read from a file of `file_size` bytes; DescriptorError if it is not ours."""
        if len(data) < _HEADER.size:
            raise DescriptorError(f"segment too small for a header ({file_size} bytes)")
        magic, version, page, size, table_offset, pages, data_offset, pid, start, created, boot, align, key = (
            _HEADER.unpack_from(data)
        )
        if magic != MAGIC:
            # Not even in the detail: the bytes of some other file are none of the log's business.
            raise DescriptorError("not an mm-sidecar arena (wrong magic)")
        if version != VERSION or page != PAGE or align != TENSOR_ALIGN:
            # Before anything else is read: a version-1 segment has no key where this one expects it.
            raise DescriptorError(f"unsupported arena format: version {version}, page {page}, align {align}")
        if key == bytes(KEY_BYTES):
            raise DescriptorError("corrupt arena header: no key")
        try:
            expected = segment_layout(size)
        except ValueError as exc:
            raise DescriptorError(f"corrupt arena header: {exc}") from exc
        # Everything a reader indexes comes from here, so the header must agree with the file
        # and with the layout rule before any offset in it is trusted.
        if size != file_size or (table_offset, pages, data_offset) != expected:
            raise DescriptorError(f"corrupt arena header: size {size} for a file of {file_size} bytes")
        return cls(size, table_offset, pages, data_offset, pid, start, created, boot, key, version, page, align)


@dataclass(frozen=True, slots=True)
class TensorDescriptor:
    """Where one tensor lies in a segment, which reservation of that memory it belongs to, and its MAC.

    `mac` is `descriptor_mac` of the six other fields under the segment's key (see the module
    docstring): only a process that can map the segment can make one, and `ArenaReader` reads
    nothing for a descriptor whose MAC does not verify. The arena makes descriptors already signed
    (`Arena.descriptor`); `signed` is the same for anyone else who holds the key.

    Constructing one checks nothing; `from_json` and every `ArenaReader` entry point call `check()`.
    """

    shm: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    generation: int
    mac: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def signed(self, key: bytes) -> TensorDescriptor:
        """This descriptor with `mac` computed under `key` (a segment's `SegmentHeader.key`)."""
        mac = descriptor_mac(key, self.shm, self.offset, self.nbytes, self.dtype, self.shape, self.generation)
        return TensorDescriptor(self.shm, self.offset, self.nbytes, self.dtype, self.shape, self.generation, mac)

    def verify(self, key: bytes) -> bool:
        """Whether `mac` is this descriptor's MAC under `key`, compared in constant time. Call `check()` first."""
        mac = descriptor_mac(key, self.shm, self.offset, self.nbytes, self.dtype, self.shape, self.generation)
        return hmac.compare_digest(self.mac, mac)

    def check(self) -> None:
        """Raise DescriptorError unless the fields are consistent with each other (no segment needed)."""
        try:
            check_segment_name(self.shm)
        except ValueError as exc:
            raise DescriptorError(f"descriptor.shm: {exc}") from None
        if self.dtype not in DTYPES:
            raise DescriptorError(f"descriptor.dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r:.40}")
        if not 0 <= self.offset < _U63:
            raise DescriptorError(f"descriptor.offset: must be in [0, 2**63), got {self.offset}")
        if not 1 <= self.generation < GENERATION_BOUND:
            raise DescriptorError(f"descriptor.generation: must be in [1, 2**62), got {self.generation}")
        # Each dim bounded too: with a 0 elsewhere in the shape, a huge one would pass the nbytes check.
        if len(self.shape) > _MAX_NDIM or any(not 0 <= d < _U63 for d in self.shape):
            raise DescriptorError(
                f"descriptor.shape: at most {_MAX_NDIM} dims, each in [0, 2**63), got {self.shape!r:.80}"
            )
        expected = self.numel * DTYPES[self.dtype]
        if self.nbytes != expected or expected >= _U63:
            raise DescriptorError(
                f"descriptor.nbytes: {self.nbytes} != prod(shape {self.shape}) x {DTYPES[self.dtype]} ({expected})"
            )
        if not isinstance(self.mac, str) or not _MAC_RE.fullmatch(self.mac):
            raise DescriptorError(f"descriptor.mac: must be 64 lowercase hex digits, got {self.mac!r:.80}")

    def to_json(self) -> dict[str, Any]:
        return {
            "shm": self.shm,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "generation": self.generation,
            "mac": self.mac,
        }

    @classmethod
    def from_json(cls, obj: object) -> TensorDescriptor:
        """Parse the JSON form strictly: exactly the seven fields, exact types (no bools as ints), consistent values.

        Unknown fields are refused rather than ignored: a newer sidecar that needs more than this
        reader checks must not be read by it as if nothing had changed. The MAC is checked against
        the segment's key by `ArenaReader`, not here: parsing needs no segment.
        """
        if not isinstance(obj, Mapping):
            raise DescriptorError(f"descriptor: must be an object, got {type(obj).__name__}")
        missing = [f for f in _FIELDS if f not in obj]
        if missing:
            raise DescriptorError(f"descriptor.{missing[0]}: missing")
        extra = sorted(str(k) for k in obj if k not in _FIELDS)
        if extra:
            raise DescriptorError(f"descriptor: unknown field {extra[0]!r:.40}")
        for name in ("shm", "dtype", "mac"):
            if not isinstance(obj[name], str):
                raise DescriptorError(f"descriptor.{name}: must be a string, got {type(obj[name]).__name__}")
        for name in ("offset", "nbytes", "generation"):
            if not _is_int(obj[name]):
                raise DescriptorError(f"descriptor.{name}: must be an integer, got {type(obj[name]).__name__}")
        shape = obj["shape"]
        if not isinstance(shape, list | tuple) or not all(_is_int(d) for d in shape):
            raise DescriptorError(f"descriptor.shape: must be a list of integers, got {shape!r:.80}")
        desc = cls(obj["shm"], obj["offset"], obj["nbytes"], obj["dtype"], tuple(shape), obj["generation"], obj["mac"])
        desc.check()
        return desc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Segment:
    """One attached segment: its read-only mapping, its header and the file identity it came from."""

    __slots__ = ("header", "ident", "mm", "name")

    def __init__(self, name: str, mm: mmap.mmap, header: SegmentHeader, ident: tuple[int, int]) -> None:
        self.name = name
        self.mm = mm
        self.header = header
        self.ident = ident

    def close(self) -> bool:
        """Unmap; False when views still hold the mapping (it then goes with the last of them)."""
        try:
            self.mm.close()
        except BufferError:
            return False
        return True


class ArenaReader:
    """Read-only access to arena segments, for engines: validate a descriptor, view or copy its tensor.

    Each segment is attached once and cached by name. Before each read the reader `stat`s the path:
    a sidecar that restarted under the same name has a new file, and descriptors are then checked
    against it (an old mapping would otherwise answer for memory nobody writes any more).

    Every entry point checks the descriptor in the same order before it reads a byte of the data
    area or makes a view: its fields (`check`), the segment (named ``mm-sidecar-...``, a regular
    private file with a valid header), its MAC under that segment's key, then the page table.
    Every refusal is a DescriptorError whose ``str()`` is `DESCRIPTOR_ERROR`; the cause is on
    ``.detail``.

    Views (`view`, `tensor`) are zero-copy and read-only; writing through a tensor from `tensor()`
    faults, since the mapping is PROT_READ. Drop every view before acking the request: after the
    ack the sidecar reuses the memory. `copy_out` is the safe default: copy, re-check, return.
    """

    def __init__(self, directory: str = "/dev/shm") -> None:
        self._directory = directory
        self._segments: dict[str, _Segment] = {}
        self._retired: list[_Segment] = []

    @property
    def segments(self) -> tuple[str, ...]:
        """Names of the segments attached now (tests use it to see that nothing was attached)."""
        return tuple(self._segments)

    def validate(self, desc: TensorDescriptor) -> None:
        """Raise DescriptorError (StaleDescriptor when the extent was reused) unless `desc` may be read now."""
        self._open(desc)

    def view(self, desc: TensorDescriptor) -> npt.NDArray[Any]:
        """A zero-copy read-only numpy view (bfloat16 comes back as its uint16 bit patterns)."""
        seg = self._open(desc)
        flat = np.frombuffer(seg.mm, dtype=NUMPY_DTYPES[desc.dtype], count=desc.numel, offset=desc.offset)
        return flat.reshape(desc.shape)

    def tensor(self, desc: TensorDescriptor) -> torch.Tensor:
        """A zero-copy read-only torch tensor over the extent (`torch.frombuffer`)."""
        return self._tensor(desc)[1]

    def copy_out(
        self, desc: TensorDescriptor, device: str | torch.device = "cpu", *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Copy the tensor to `device` (or into `out`), then check the generation again.

        The second check catches a sidecar that gave up on the request (ack timeout) and reused the
        extent while we were copying: the copy may then mix two requests, so it raises StaleDescriptor.

        `out`, when given, must have the descriptor's shape and dtype; it is written and returned. An
        engine passes a buffer it keeps from one request to the next: a fresh destination pays a page
        fault per page written, which costs more than the copy itself for tensors of tens of MB.
        """
        if out is not None and out.device.type == "cpu" and out.is_contiguous():
            return self._copy_into_host(desc, out)
        seg, src = self._tensor(desc)
        if out is None:
            out = self._copy(src, device)
        else:
            _check_out(out, tuple(src.shape), src.dtype)
            out.copy_(src)
        del src
        self._check_extent(seg, desc, after_copy=True)
        return out

    def close(self) -> None:
        """Unmap every segment. Raises BufferError, after closing the rest, if views outlive the reader."""
        busy = [seg.name for seg in (*self._segments.values(), *self._retired) if not seg.close()]
        self._segments.clear()
        self._retired.clear()
        if busy:
            raise BufferError(
                f"arena views outlive the reader for {', '.join(busy)}: drop views before acking; "
                "the mapping is released with the last view"
            )

    def __enter__(self) -> ArenaReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------- internals

    def _copy_into_host(self, desc: TensorDescriptor, out: torch.Tensor) -> torch.Tensor:
        """`copy_out` into a contiguous host tensor: a byte copy between numpy views.

        No torch tensor over the mapping is made, which spares the per-call cost of
        `torch.frombuffer` on a read-only buffer (a warning filter each time): for a tensor of
        1 MB that overhead is as large as the copy.
        """
        import torch  # noqa: PLC0415 - torch stays optional for importers of the contract

        seg = self._open(desc)
        _check_out(out, desc.shape, getattr(torch, desc.dtype))
        if desc.nbytes:
            src = np.frombuffer(seg.mm, dtype=np.uint8, count=desc.nbytes, offset=desc.offset)
            np.copyto(out.reshape(-1).view(torch.uint8).numpy(), src)
            del src  # before the check: a raise must not leave a view on the mapping
        self._check_extent(seg, desc, after_copy=True)
        return out

    def _copy(self, src: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        import torch  # noqa: PLC0415 - torch stays optional for importers of the contract

        out = torch.empty(src.shape, dtype=src.dtype, device=device)
        out.copy_(src)
        return out

    def _tensor(self, desc: TensorDescriptor) -> tuple[_Segment, torch.Tensor]:
        import torch  # noqa: PLC0415 - torch stays optional for importers of the contract

        seg = self._open(desc)
        dtype: torch.dtype = getattr(torch, desc.dtype)
        if desc.numel == 0:
            # torch.frombuffer refuses empty buffers; an empty tensor shares nothing anyway.
            return seg, torch.empty(desc.shape, dtype=dtype)
        buf = memoryview(seg.mm)[desc.offset : desc.offset + desc.nbytes]
        with warnings.catch_warnings():
            # The buffer is read-only on purpose; torch warns because it has no read-only tensors.
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            flat = torch.frombuffer(buf, dtype=dtype)
        return seg, flat.view(desc.shape)

    def _open(self, desc: TensorDescriptor) -> _Segment:
        """The segment `desc` may be read from now; DescriptorError (StaleDescriptor) otherwise.

        The MAC comes before the page table: a forged descriptor learns nothing of the table, not
        even through what the reader does next.
        """
        desc.check()
        seg = self._segment(desc.shm)
        if not desc.verify(seg.header.key):
            raise DescriptorError(
                f"descriptor [{desc.offset}, +{desc.nbytes}) generation {desc.generation} in segment {desc.shm!r}: "
                "MAC does not verify under the segment's key (forged, altered, or from a predecessor segment)"
            )
        self._check_extent(seg, desc, after_copy=False)
        return seg

    def _segment(self, name: str) -> _Segment:
        # `name` passed check_segment_name (TensorDescriptor.check): it has our prefix and no "/".
        path = os.path.join(self._directory, name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise StaleDescriptor(f"segment {name!r} does not exist in {self._directory}") from None
        except OSError as exc:
            raise DescriptorError(f"segment {name!r}: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            # Refused before any open: a FIFO, socket or device is never anyone's segment.
            raise DescriptorError(f"segment {name!r} is not a regular file")
        cached = self._segments.get(name)
        if cached is not None:
            if cached.ident == (st.st_dev, st.st_ino):
                return cached
            # Replaced by a restarted sidecar: keep the old mapping until its views are gone.
            del self._segments[name]
            if not cached.close():
                self._retired.append(cached)
        self.prune()
        seg = self._attach(name, path)
        self._segments[name] = seg
        return seg

    def prune(self) -> list[str]:
        """Drop the mappings of segments whose file is gone (a sidecar that stopped or restarted).

        A deleted file that is still mapped keeps its tmpfs pages: without this an engine that
        outlives a sidecar restart would hold the old arena forever, and the new sidecar's
        `posix_fallocate` could fail for want of room. Called whenever a new segment is attached.
        """
        dropped = []
        for name, seg in list(self._segments.items()):
            try:
                st = os.stat(os.path.join(self._directory, name), follow_symlinks=False)
                alive = (st.st_dev, st.st_ino) == seg.ident
            except OSError:
                alive = False
            if not alive:
                del self._segments[name]
                if not seg.close():
                    self._retired.append(seg)
                dropped.append(name)
        self._retired = [seg for seg in self._retired if not seg.close()]
        return dropped

    def _attach(self, name: str, path: str) -> _Segment:
        # O_NONBLOCK: if a FIFO replaced the file since the stat, opening it must not wait for a writer
        # (it changes nothing for a regular file).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise StaleDescriptor(f"segment {name!r} does not exist in {self._directory}") from None
        except OSError as exc:
            # ELOOP: a symlink planted under the segment's name is refused, never followed.
            raise DescriptorError(f"segment {name!r}: cannot open: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DescriptorError(f"segment {name!r} is not a regular file")
            if st.st_mode & 0o077:
                # The creator makes it 0600. A file others may read has a key others may know,
                # and its MACs would prove nothing.
                raise DescriptorError(f"segment {name!r} is open to other users (mode {stat.S_IMODE(st.st_mode):o})")
            header = SegmentHeader.unpack(os.pread(fd, PAGE, 0), st.st_size)
            mm = mmap.mmap(fd, header.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            raise DescriptorError(f"segment {name!r}: cannot map: {exc.strerror}") from exc
        finally:
            os.close(fd)
        return _Segment(name, mm, header, (st.st_dev, st.st_ino))

    def _check_extent(self, seg: _Segment, desc: TensorDescriptor, *, after_copy: bool) -> None:
        head = seg.header
        end = desc.offset + desc.nbytes
        if desc.offset < head.data_offset or end > head.data_end:
            raise DescriptorError(
                f"descriptor [{desc.offset}, {end}) is outside the data area "
                f"[{head.data_offset}, {head.data_end}) of segment {desc.shm!r}"
            )
        if desc.offset % TENSOR_ALIGN:
            raise DescriptorError(f"descriptor.offset {desc.offset} is not a multiple of {TENSOR_ALIGN}")
        if desc.offset == head.data_end:
            # Only an empty tensor can sit here, and no page (hence no owner) lies behind it.
            raise DescriptorError(f"descriptor.offset {desc.offset} is at the end of the data area")
        # An empty tensor is checked against the page its offset lies in.
        first = (desc.offset - head.data_offset) // PAGE
        last = (end - 1 - head.data_offset) // PAGE if desc.nbytes else first
        entries = np.frombuffer(seg.mm, dtype="<u8", count=last - first + 1, offset=head.table_offset + 8 * first)
        bad = np.flatnonzero(entries != table_entry(desc.generation, STATE_READY))
        word = int(entries[bad[0]]) if bad.size else 0
        # Drop the view before raising: a traceback kept by the caller would otherwise pin the mapping.
        del entries
        if not bad.size:
            return
        generation, state = word >> _STATE_BITS, word & ((1 << _STATE_BITS) - 1)
        where = f"segment {desc.shm!r} page {first + int(bad[0])}"
        if after_copy:
            raise StaleDescriptor(
                f"{where} changed while it was copied (generation {desc.generation} -> {generation}, "
                f"{_STATE_NAMES[state]}): the sidecar reused the extent"
            )
        if generation == desc.generation and state == STATE_WRITING:
            raise DescriptorError(f"{where}: extent generation {generation} is not published yet")
        raise StaleDescriptor(
            f"{where} holds generation {generation} ({_STATE_NAMES[state]}), the descriptor "
            f"generation {desc.generation}: the extent was freed or reused"
        )


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"copy_out: out is {out.dtype} {list(out.shape)}, the descriptor {dtype} {list(shape)}")


def shm_token(directory: str = "/dev/shm") -> str:
    """Who sees this shared memory: boot id + device number of `directory`.

    The engine reports it in its health answer; the sidecar compares it with its own before
    offloading, since descriptors are meaningless to an engine on another host or another tmpfs.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown"
    return f"{boot}:{os.stat(directory).st_dev}"


# -- uint8 pixels: the normalisation the engine applies ----------------------------------------

_NORMALIZE_KEYS: Final[tuple[str, ...]] = ("rescale_factor", "image_mean", "image_std")


@dataclass(frozen=True, slots=True)
class ImageNormalization:
    """How an image processor that rescales and normalises turns raw pixels (0..255) into pixel_values.

    Per channel ``c``: ``(float32(float64(x) * rescale_factor) - float32(image_mean[c])) /
    float32(image_std[c])``, the subtraction and division in float32. That is transformers' arithmetic
    (``image_transforms.rescale`` upcasts to float64 and casts back to float32; ``normalize`` works in
    the image's float32), so uint8 patches normalised this way equal the processor's own float32
    output bit for bit. Equality (``==``) is exact, float for float: that is how a part's ``normalize``
    is checked against the model's.
    """

    rescale_factor: float
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @classmethod
    def from_processor(cls, processor: Any, channels: int) -> ImageNormalization | None:
        """The processor's normalisation, one mean and std per channel; None when it does not both
        rescale and normalise (its float32 pixels are then not this arithmetic of the raw ones)."""
        if not (getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)):
            return None

        def per_channel(name: str) -> tuple[float, ...]:
            value = getattr(processor, name)
            # A single number applies to every channel, as transformers' normalize() reads it.
            values = [value] * channels if isinstance(value, int | float) else list(value)
            if len(values) != channels:
                raise ValueError(f"the image processor's {name} has {len(values)} values for {channels} channels")
            return tuple(float(v) for v in values)

        return cls(float(processor.rescale_factor), per_channel("image_mean"), per_channel("image_std"))

    @classmethod
    def from_json(cls, value: Any, where: str) -> ImageNormalization:
        """A part's ``normalize`` object, exactly {rescale_factor: number, image_mean: [numbers],
        image_std: [numbers]}; ValueError naming ``where`` otherwise. Numbers are taken as given
        (an integer is the same float), never rounded."""
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: must be an object with {', '.join(_NORMALIZE_KEYS)}")
        if set(value) != set(_NORMALIZE_KEYS):
            got = ", ".join(sorted(str(k)[:40] for k in value)[:8]) or "none"
            raise ValueError(f"{where}: must have exactly the keys {', '.join(_NORMALIZE_KEYS)} (got {got})")

        def number(v: Any, field: str) -> float:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"{where}.{field}: must be a number")
            return float(v)

        def numbers(field: str) -> tuple[float, ...]:
            values = value[field]
            if not isinstance(values, list):
                raise ValueError(f"{where}.{field}: must be an array of numbers, one per channel")
            return tuple(number(v, f"{field}[{k}]") for k, v in enumerate(values))

        return cls(number(value["rescale_factor"], "rescale_factor"), numbers("image_mean"), numbers("image_std"))

    def to_json(self) -> dict[str, Any]:
        return {
            "rescale_factor": self.rescale_factor,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    def table(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        """(channels, 256) float32: the normalised value of every raw value in every channel, computed
        with transformers' own numpy arithmetic. Each output value depends only on its channel and its
        raw value, so looking it up here gives the same bits as computing it, on any device."""
        raw = np.arange(256, dtype=np.uint8)
        rescaled = (raw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.array(self.image_mean, dtype=np.float32)
        std = np.array(self.image_std, dtype=np.float32)
        out: np.ndarray[Any, np.dtype[np.float32]] = (rescaled[None, :] - mean[:, None]) / std[:, None]
        return out


def check_normalize(given: Any, dtype: str | None, own: ImageNormalization | None, field: str, no_uint8: str) -> None:
    """A tensor part's `normalize` (`given`, JSON null is absent) against its pixel_values' dtype and
    the normalisation the engine applies (`own`; None: it takes no uint8 pixel_values, for the reason
    `no_uint8` gives). ValueError naming `field` and what differs; the engine answers it as a 400.

    uint8 pixel_values need one, equal to `own` exactly, float for float (both sides read the same
    JSON config); any other dtype must come without one. `normalize` is not covered by the
    descriptors' MAC, and need not be: it is never trusted, only compared with the engine's own
    configuration, and the engine normalises with its own.
    """
    if dtype != "uint8":
        if given is not None:
            what = "no pixel_values" if dtype is None else f"{dtype} pixel_values"
            raise ValueError(
                f"{field}: only uint8 pixel_values carry a normalisation; this part has {what}, used as they are"
            )
        return
    if own is None:
        raise ValueError(f"{field}: {no_uint8}: it takes no uint8 pixel_values")
    if given is None:
        raise ValueError(
            f"{field}: uint8 pixel_values need the normalisation they were made for "
            f"(rescale_factor, image_mean, image_std); this model's is {_json(own.to_json())}"
        )
    theirs = ImageNormalization.from_json(given, field)
    if theirs == own:
        return
    for name in ("image_mean", "image_std"):
        if len(getattr(theirs, name)) != len(getattr(own, name)):
            raise ValueError(
                f"{field}.{name}: has {len(getattr(theirs, name))} values, this model's image processor "
                f"has {len(getattr(own, name))} (one per channel)"
            )
    raise ValueError(
        f"{field}: {_json(theirs.to_json())} does not match this model's image processor "
        f"({_json(own.to_json())}): the sidecar's preprocess.processor must be the served model's"
    )


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
