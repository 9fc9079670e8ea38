"""What a preprocessing worker process does with one image: decode, run the processor, write the arena.

The worker loads its processor once (`WorkerSetup`, run at process start), attaches the arena
read-write, and for each `ImageTask` writes every named processor output straight into the extent
the sidecar reserved for it, at `pack_tensors` offsets. It returns only descriptors and timings:
tensors never travel through the pipe.

A task carries the image as the client sent it (base64 text or bytes): base64 decoding, like image
decoding, happens here and never on the sidecar's event loop. The cost model's predicted shapes
travel with the task and are checked against the real outputs, so an admission that reserved the
wrong number of bytes is an error here, not an overrun into a neighbour's extent.
"""

from __future__ import annotations

import binascii
import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .arena import Arena, Extent, pack_tensors
from .processors import decode, load_processor, run_processor

Shapes = dict[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True, slots=True)
class WorkerState:
    processor: Any
    arena: Arena


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """Picklable start-up of a worker process: what to load and which arena to attach."""

    processor: str
    arena_name: str
    arena_dir: str

    def __call__(self) -> WorkerState:
        return WorkerState(load_processor(self.processor), Arena.attach(self.arena_name, self.arena_dir))


@dataclass(frozen=True, slots=True)
class ImageTask:
    data: bytes | str  # the encoded image, or its base64 text
    extent: Extent
    expected: Shapes  # name -> (shape, dtype), from preprocess.cost


@dataclass(frozen=True, slots=True)
class ImageResult:
    tensors: dict[str, dict[str, Any]]  # name -> TensorDescriptor.to_json()
    used_nbytes: int
    decode_s: float
    preprocess_s: float
    write_s: float


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim with
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def _trim_heap() -> None:
    """Hand freed heap back to the OS after each image.

    Decoded images and float32 intermediates are tens to hundreds of MB; glibc keeps freed memory in
    its arenas, so without this a worker's RSS stays at its largest image forever, and the memory
    ceiling the operator sized for is exceeded by every worker's high-water mark at once.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def process_image(state: WorkerState, task: ImageTask) -> ImageResult:
    started = time.perf_counter()
    data = task.data
    if isinstance(data, str):
        try:
            data = binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError(f"invalid base64 data ({exc})") from None
    image = decode(data)
    decoded = time.perf_counter()
    outputs = run_processor(state.processor, image)
    processed = time.perf_counter()

    got = {name: (tuple(int(d) for d in a.shape), str(a.dtype)) for name, a in outputs.items()}
    if got != task.expected:
        raise RuntimeError(f"processor outputs {got} differ from the cost model's {task.expected}")
    offsets, total = pack_tensors([a.nbytes for a in outputs.values()])
    if total > task.extent.capacity:
        raise RuntimeError(f"processor outputs take {total} bytes, the extent holds {task.extent.capacity}")
    tensors = {
        name: state.arena.write(task.extent, offset, array).to_json()
        for (name, array), offset in zip(outputs.items(), offsets, strict=True)
    }
    written = time.perf_counter()
    del image, outputs
    _trim_heap()
    return ImageResult(
        tensors=tensors,
        used_nbytes=total,
        decode_s=decoded - started,
        preprocess_s=processed - decoded,
        write_s=written - processed,
    )
