"""What a preprocessing worker process does with one image: decode, run the processor, write the arena.

The worker loads its processor once (`WorkerSetup`, run at process start), attaches the arena
read-write, and for each `ImageTask` writes every named processor output straight into the extent
the sidecar reserved for it, at `pack_tensors` offsets. It returns only descriptors and timings:
tensors never travel through the pipe.

A task carries the image as the client sent it (base64 text or bytes), copied into the start of its
own extent when it fits there (`stage`: cheaper than the pipe) or else in the task itself: base64
decoding, like image decoding, happens here and never on the sidecar's event loop. After each image
the worker checks its heap and gives freed memory back only when it holds too much (`HeapKeeper`).
The cost model's predicted shapes travel with the task and are checked against the real outputs, so
an admission that reserved the wrong number of bytes is an error here, not an overrun into a
neighbour's extent.

With ``fast_path`` on (the default, ``preprocess.fast_path``), a worker whose processor the fast
path covers (`preprocess.fastpath`: Qwen2-VL / Qwen2.5-VL; `preprocess.fastpath_clip`: CLIP and
SigLIP; each proven bit-identical at start-up) writes
the outputs straight into the extent instead of running the processor and copying; any other
processor, or an image the fast path does not take, goes through transformers as before. The
tensors are the same bits either way.
"""

from __future__ import annotations

import binascii
import ctypes
import dataclasses
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from PIL import Image

from .arena import Arena
from .extents import Extent, pack_tensors
from .fastpath import FastPath, NotCovered, Qwen2VLFastPath, SelfCheckFailed
from .fastpath_clip import ClipFastPath
from .processors import bfloat16_bits, decode, load_processor, raw_normalisation, run_processor
from .protocol import NUMPY_DTYPES
from .spans import SpanText, Text

Shapes = dict[str, tuple[tuple[int, ...], str]]

log = logging.getLogger("mm_sidecar.worker")


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerState:
    processor: Any
    arena: Arena
    heap: HeapKeeper
    fast: FastPath | None = None  # None: every image goes through the processor
    # preprocess.transport_dtype uint8: the processor's raw patches, and the normalisation the engine applies
    normalize: dict[str, Any] | None = None
    pixels: str = "float32"  # preprocess.transport_dtype


# Tried in order; each class's `for_processor` takes the processors it covers and refuses the rest.
FAST_PATHS: tuple[Any, ...] = (Qwen2VLFastPath, ClipFastPath)


def fast_path_for(processor: Any, *, pixels: str = "float32") -> FastPath | None:
    """The bit-identical fast path for `processor` writing `pixels` (preprocess.transport_dtype), or
    None (logged) where none covers it."""
    refusals = []
    for kind in FAST_PATHS:
        try:
            fast: FastPath = kind.for_processor(processor, pixels=pixels)
            return fast
        except SelfCheckFailed as exc:
            # Covered on paper, refused by its own proof: a transformers or Pillow change to look into.
            log.warning("preprocessing fast path off: %s", exc)
            return None
        except NotCovered as exc:
            refusals.append(f"{kind.__name__}: {exc}")
    log.info("preprocessing fast path off: %s", "; ".join(refusals))
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSetup:
    """Picklable start-up of a worker process: what to load and which arena to attach."""

    processor: str
    arena_name: str
    arena_dir: str
    fast_path: bool = True  # preprocess.fast_path: use preprocess.fastpath where it covers the processor
    pixels: str = "float32"  # preprocess.transport_dtype

    def __call__(self) -> WorkerState:
        processor = load_processor(self.processor)
        fast = fast_path_for(processor, pixels=self.pixels) if self.fast_path else None
        normalize = raw_normalisation(processor) if self.pixels == "uint8" else None
        arena = Arena.attach(self.arena_name, self.arena_dir)
        return WorkerState(processor, arena, HeapKeeper(), fast, normalize, self.pixels)


@dataclasses.dataclass(frozen=True, slots=True)
class Staged:
    """A task's input, copied by the sidecar to the start of the task's own extent (see `stage`)."""

    nbytes: int
    base64: bool  # base64 text (ASCII); else the encoded image's bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ImageTask:
    data: bytes | str | Staged  # the encoded image, or its base64 text, or where `stage` put either
    extent: Extent
    expected: Shapes  # name -> (shape, dtype), from preprocess.cost


@dataclasses.dataclass(frozen=True, slots=True)
class ImageResult:
    tensors: dict[str, dict[str, Any]]  # name -> TensorDescriptor.to_json()
    used_nbytes: int
    decode_s: float  # bytes (base64 included) to the decoded image
    preprocess_s: float  # the decoded image to the tensors in the arena (write_s included)
    write_s: float  # of preprocess_s, copying the processor's outputs into the arena (0: written in place)
    heap_trimmed: bool = False  # the worker gave its freed heap back after this image (HeapKeeper)
    fast_path: bool = False  # written by preprocess.fastpath, not by the transformers processor
    normalize: dict[str, Any] | None = None  # uint8 pixel_values: the normalisation the engine applies


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim with
    return trim


_MALLOC_TRIM = _load_malloc_trim()

MiB = 1 << 20
# How far a worker's anonymous memory may rise above its level right after its last trim before it
# trims again (a preprocess.* setting in spirit; a constant until an operator needs to tune it).
# 64 MiB keeps an idle worker (~360 MiB with a processor loaded) inside sidecar.ceiling's
# WORKER_BASE of 448 MiB, and is above what a 1080p image leaves behind (measured 15-57 MiB for
# qwen2-vl and llava-1.5, photo to noise), so a stream of ordinary images does not pay for trims.
HEAP_SLACK = 64 * MiB


def _trim_heap() -> None:
    """Hand all freed heap back to the OS now (`malloc_trim(0)`; a no-op where libc is not glibc).

    Decoded images and float32 intermediates are tens to hundreds of MB; glibc keeps freed memory
    below its mmap threshold (up to 32 MiB a block) in its arenas, so without trimming a worker's RSS
    can stay at its largest image's high-water mark, and the memory ceiling the operator sized for
    is exceeded by every worker's high-water mark at once. `HeapKeeper` decides when a worker calls it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class HeapKeeper:
    """Trims a worker's heap after an image only when it holds more than `slack` above its floor.

    Trimming after every image bounded RSS but cost 13-14% of a 1080p image (measured, one process:
    +17 ms on qwen2-vl's 120 ms, +6 ms on llava-1.5's 46 ms): the trim itself takes microseconds, the
    price is the next image faulting every returned page in again, zeroed. So after each image the
    worker reads its anonymous RSS (`/proc/self/statm` resident minus shared: arena pages the worker
    writes are shared, not heap; ~3 us) and trims only when it is more than `slack` above the floor,
    the anonymous RSS measured right after the previous trim (lowered whenever a reading is below
    it). The first image always trims, so the floor includes what the first processor call imports
    lazily.

    Guarantee: after every image, a worker's anonymous RSS is at most `slack` above what it was right
    after its last trim, whatever the largest image it processed; memory a trim cannot return (live
    objects) raises the floor, as it would raise RSS with a trim after every image.
    """

    def __init__(self, slack: int = HEAP_SLACK) -> None:
        self.slack = slack
        self.floor: int | None = None  # anonymous RSS right after the last trim; None: not trimmed yet
        self.trims = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        # Opened once: a pread of an open /proc file regenerates it, at a fifth of open + read + close.
        self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)

    def anon_rss(self) -> int:
        """Resident anonymous memory of this process, in bytes (statm: resident - shared pages)."""
        fields = os.pread(self._statm, 128, 0).split()
        return (int(fields[1]) - int(fields[2])) * self._page

    def after_image(self) -> bool:
        """Trim if the heap outgrew the floor by more than `slack`; whether it trimmed."""
        if _MALLOC_TRIM is None:
            return False
        anon = self.anon_rss()
        if self.floor is not None and anon <= self.floor + self.slack:
            self.floor = min(self.floor, anon)
            return False
        _trim_heap()
        self.trims += 1
        self.floor = self.anon_rss()
        return True


# The largest input `stage` copies: the copy runs on the sidecar's event loop (~0.1 ms a MiB, measured
# here: encode plus memcpy), so larger inputs travel through the pipe, where the sending thread does it.
STAGE_MAX = 8 * MiB


def stage(arena: Arena, extent: Extent, data: bytes | Text) -> bytes | str | Staged:
    """The task's input as it should travel to the worker: copied into `extent`, or `data` unchanged.

    Sent through the pipe, an input costs the worker ~1 ms a MiB of waiting (measured: a 1 MiB
    text arrives 1.0 ms after the send starts, a 5.7 MiB one 7.4 ms after), the parent's socket
    writes and the worker's reads taking turns on 2 cores; copied into shared memory, ~0.1 ms a MiB of
    the parent's time and none of the worker's. The worker reads it before it writes any output
    there, so the extent holds both in turn. Only inputs that fit the extent and `STAGE_MAX` are
    staged; a str that is not ASCII is not (the worker reports it as invalid base64).
    """
    is_text = not isinstance(data, bytes)
    if not 0 < len(data) <= min(extent.capacity, STAGE_MAX) or (not isinstance(data, bytes) and not data.isascii()):
        return data.text() if isinstance(data, SpanText) else data
    # A SpanText (base64 left in the request body's buffer) is copied piece by piece: never one str.
    chunks: Iterable[bytes | memoryview]
    if isinstance(data, SpanText):
        chunks = data.chunks()
    elif isinstance(data, str):
        chunks = (data.encode("ascii"),)
    else:
        chunks = (data,)
    view = arena.ndarray_view(extent, 0, "uint8", (len(data),))
    offset = 0
    for chunk in chunks:
        view[offset : offset + len(chunk)] = np.frombuffer(chunk, np.uint8)
        offset += len(chunk)
    del view
    return Staged(len(data), is_text)


def _unstage(state: WorkerState, task: ImageTask, staged: Staged) -> bytes:
    # Released on the way out, even on error: a view left alive pins the arena's mapping.
    with state.arena.ndarray_view(task.extent, 0, "uint8", (staged.nbytes,)).data as buf:
        return _b64decode(buf) if staged.base64 else bytes(buf)


def _b64decode(text: str | memoryview) -> bytes:
    try:
        # a2b_base64 reads an ASCII str or a buffer in place: no copy of a text that can be megabytes.
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError as exc:  # binascii.Error, and a str that is not ASCII
        raise ValueError(f"invalid base64 data ({exc})") from None


def process_image(state: WorkerState, task: ImageTask) -> ImageResult:
    try:
        result = _process_image(state, task)
    except Exception as exc:
        # A failed image can have allocated as much as a good one, and the traceback's frames still
        # hold it: drop those locals first, so that the heap check sees that memory as free.
        traceback.clear_frames(exc.__traceback__)
        state.heap.after_image()
        raise
    return dataclasses.replace(result, heap_trimmed=state.heap.after_image())


def _process_image(state: WorkerState, task: ImageTask) -> ImageResult:
    started = time.perf_counter()
    data = task.data
    if isinstance(data, Staged):
        data = _unstage(state, task, data)
    image = decode(_b64decode(data) if isinstance(data, str) else data)
    decoded = time.perf_counter()
    if state.fast is not None and state.fast.accepts(image):
        tensors, total = _write_fast(state, task, state.fast, image)
        written = time.perf_counter()
        return ImageResult(
            tensors=tensors,
            used_nbytes=total,
            decode_s=decoded - started,
            preprocess_s=written - decoded,
            write_s=0.0,
            fast_path=True,
            normalize=state.normalize,
        )
    outputs = run_processor(state.processor, image, raw=state.normalize is not None)
    dtypes = {name: str(a.dtype) for name, a in outputs.items()}
    if state.pixels == "bfloat16":
        outputs["pixel_values"] = bfloat16_bits(outputs["pixel_values"])  # as an engine would round them
        dtypes["pixel_values"] = "bfloat16"
    processed = time.perf_counter()

    got = {name: (tuple(int(d) for d in a.shape), dtypes[name]) for name, a in outputs.items()}
    _check_expected(got, task)
    offsets, total = pack_tensors([a.nbytes for a in outputs.values()])
    _check_fits(total, task)
    tensors = {
        name: state.arena.write(task.extent, offset, array, dtype=dtypes[name]).to_json()
        for (name, array), offset in zip(outputs.items(), offsets, strict=True)
    }
    written = time.perf_counter()
    return ImageResult(
        tensors=tensors,
        used_nbytes=total,
        decode_s=decoded - started,
        preprocess_s=written - decoded,
        write_s=written - processed,
        normalize=state.normalize,
    )


def _write_fast(
    state: WorkerState, task: ImageTask, fast: FastPath, image: Image.Image
) -> tuple[dict[str, dict[str, Any]], int]:
    """The fast path's outputs written in place in the extent: their descriptors and the payload total.

    The shapes are known before any pixel is touched, so a cost-model mismatch fails before writing.
    """
    shapes = fast.output_shapes(image.width, image.height)  # ValueError where the processor refuses
    _check_expected(shapes, task)
    offsets, total = pack_tensors([math.prod(shape) * NUMPY_DTYPES[dtype].itemsize for shape, dtype in shapes.values()])
    _check_fits(total, task)
    views = {
        name: state.arena.ndarray_view(task.extent, offset, dtype, shape)
        for (name, (shape, dtype)), offset in zip(shapes.items(), offsets, strict=True)
    }
    try:
        fast.write(image, views)
    finally:
        views.clear()  # a view left alive pins the arena's mapping
    tensors = {
        name: state.arena.descriptor(task.extent, offset, dtype, shape).to_json()
        for (name, (shape, dtype)), offset in zip(shapes.items(), offsets, strict=True)
    }
    return tensors, total


def _check_expected(got: Shapes, task: ImageTask) -> None:
    if got != task.expected:
        raise RuntimeError(f"processor outputs {got} differ from the cost model's {task.expected}")


def _check_fits(total: int, task: ImageTask) -> None:
    if total > task.extent.capacity:
        raise RuntimeError(f"processor outputs take {total} bytes, the extent holds {task.extent.capacity}")
