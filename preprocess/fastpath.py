"""Fast preprocessing bit-identical to transformers: from a decoded image to the tensors in the arena.

transformers' PIL-backend Qwen2-VL processor (``Qwen2VLImageProcessorPil``, 5.x; Qwen2.5-VL uses the
same class) makes a new array at every step of its ``_preprocess``:

1. ``convert_to_rgb``: ``np.array`` of the RGB image, (H, W, 3) uint8, moved to (3, H, W);
2. ``resize``: back to a PIL image, ``Image.resize((w, h), resample)`` to ``smart_resize``'s size
   (rounded to multiples of ``patch_size * merge_size``, scaled into [min_pixels, max_pixels]), back
   to (3, h, w) uint8. It resizes even when only rounding: 1920x1080 becomes 1932x1092;
3. ``rescale``: ``x.astype(float64) * rescale_factor``, cast to float32;
4. ``normalize``: ``(x - mean) / std`` in float32, per channel;
5. ``patchify``: (3, h, w) to (grid_h * grid_w, 3 * T * P * P), each patch's frame repeated
   ``temporal_patch_size`` (T) times, in one transposing copy.

``Qwen2VLFastPath`` computes the same bits in fewer passes, writing straight into the destination
(a view over the request's extent). With the compiled loops (``preprocess.kernels``, the default
where they built and proved equal to the installed PIL):

* resize: PIL's own fixed-point resampling, reimplemented bit for bit in C (Pillow's coefficients,
  pass order and rounding; the integer sums in AVX2), reading the decoded image's memory (Pillow's
  Arrow export: no copy). An image already at the target size is not copied at all;
* rescale and normalize are elementwise per channel and their inputs are uint8, so their float32
  results form a 3 x 256 table. It is computed once per processor by the processor's own
  ``rescale`` and ``normalize`` methods on an image holding every value in every channel, so the
  table is those methods' bits, not a re-implementation of their arithmetic;
* patchify: one compiled pass over the resized pixels in patch order writes each item through the
  table (float32 bits, bfloat16 bits, or the byte itself for uint8 transport), each frame
  ``temporal_patch_size`` times. No float image is ever materialised.

Without them (``use_kernel=False``, or no compiler), the same bits come from numpy and PIL: PIL's
``Image.resize`` call; each channel plane, as PIL packs it, rearranged into patch order by one
transposing copy whose items are patch rows (P bytes); then one gather per pair of neighbouring
pixels (a 65,536-entry table per channel of float32 pairs, built from the 256-entry one) writing
every float in its final place, in chunks of patches whose index scratch stays in cache.

Coverage. ``Qwen2VLFastPath.for_processor`` takes a processor only when it is exactly
``Qwen2VLImageProcessorPil`` (a subclass may override any step) with ``do_convert_rgb``,
``do_resize``, ``do_rescale`` and ``do_normalize`` on, a PIL resampling filter, 3-channel mean and
std, and a patch with an even number of pixels (the pair gather); and then only after proving
itself: it runs the processor and itself on two small synthetic images (one at a size smart_resize
keeps, with every value in every channel; one it resizes, with an odd size and random pixels) and
accepts only bit-identical outputs. Anything else raises ``NotCovered`` with the reason, and the
caller runs transformers. Per image, ``accepts`` takes only what ``processors.decode`` returns (a
loaded "RGB" image without a ``transparency`` entry): on those ``convert_to_rgb`` is a plain copy.
Images the processor refuses (aspect ratio above 200) raise the same ``ValueError``, from the same
``smart_resize``.

Speed (``bench/preprocess_throughput.py``, one core, decode included, float32 at the preset's
max_pixels): about 3.5x transformers at 720p and 4.4x at 1080p (1080p: decode ~18 ms, the compiled
resize to 1932x1092 ~13 ms where PIL's takes ~50, patchify ~13 ms writing 48 MiB; transformers
~210 ms), 9x at 12 MP (no resize). The numpy steps alone: about 1.8x and 2.1x, PIL's resize then
being most of the time.

transformers is imported inside ``for_processor`` only: importing this module stays light.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from . import kernels
from .kernels import Kernel
from .processors import bfloat16_bits, run_processor
from .protocol import NUMPY_DTYPES

__all__ = [
    "CHANNELS",
    "FastPath",
    "NotCovered",
    "Qwen2VLFastPath",
    "SelfCheckFailed",
    "Shapes",
    "table_path_filter",
    "value_table",
]

Shapes = dict[str, tuple[tuple[int, ...], str]]

CHANNELS: Final[int] = 3
# Patches per gather call: the intp index scratch is CHUNK * 3 * T * P * P / 2 * 8 bytes (225 KiB for
# Qwen2-VL's 14-pixel patches), so it stays in L2 between its two passes (widen, then gather).
CHUNK: Final[int] = 48
# PIL's resampling filters: the convolutions the kernels run, and NEAREST, which PIL itself runs.
_FILTERS: Final[frozenset[int]] = kernels.FILTERS | {int(Image.Resampling.NEAREST)}
_SELF_CHECK_ODD_SIZE: Final[tuple[int, int]] = (97, 61)  # (width, height): not multiples of any factor


class NotCovered(ValueError):
    """The fast path does not cover this processor (the message says why): run transformers instead."""


class SelfCheckFailed(NotCovered):
    """A processor the fast path covers on paper whose outputs differ from the fast path's on a test image."""


class FastPath(Protocol):
    """What a worker needs of a fast path: built per processor by its class's ``for_processor``
    (which proves it bit-identical or raises ``NotCovered``), then used per image."""

    def accepts(self, image: Image.Image) -> bool:
        """Whether this path takes ``image`` (else the worker runs transformers for it)."""
        ...

    def output_shapes(self, width: int, height: int) -> Shapes:
        """Name -> (shape, dtype name) of the outputs for a ``width`` x ``height`` image."""
        ...

    def write(self, image: Image.Image, outputs: Mapping[str, npt.NDArray[Any]]) -> None:
        """Fill caller-provided C-contiguous arrays of ``output_shapes``' shapes (views over an extent)."""
        ...

    def run(self, image: Image.Image) -> dict[str, npt.NDArray[Any]]:
        """The outputs in new arrays (tests, benchmarks)."""
        ...


PIXELS: Final[tuple[str, ...]] = ("float32", "bfloat16", "uint8")  # preprocess.transport_dtype


def _pair_table(table: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Per channel, the value pair for every two consecutive uint8 pixels read as one uint16.

    ``table`` holds 4-byte (float32) or 2-byte (bfloat16 bits) values. Built from the bytes of each
    uint16 value as they lie in memory, so the pairing is right on any byte order. Each pair is
    viewed as one item of twice the width: the gather moves 8 (or 4) bytes per index.
    """
    first, second = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2).T
    pairs = np.empty((table.shape[0], 1 << 16, 2), table.dtype)
    pairs[:, :, 0] = table[:, first]
    pairs[:, :, 1] = table[:, second]
    wide = np.uint64 if table.itemsize == 4 else np.uint32
    return pairs.view(wide).reshape(table.shape[0], 1 << 16)


class Qwen2VLFastPath:
    """Qwen2-VL / Qwen2.5-VL preprocessing, bit-identical to the processor it was built from.

    Build with ``for_processor``. ``output_shapes`` gives the outputs' shapes for an image size;
    ``write`` fills caller-provided arrays of those shapes (views into the arena); ``run`` allocates
    them (tests, benchmarks).
    """

    def __init__(
        self,
        *,
        table: npt.NDArray[np.float32],
        patch_size: int,
        merge_size: int,
        temporal_patch_size: int,
        min_pixels: int,
        max_pixels: int,
        resample: int,
        smart_resize: Callable[..., tuple[int, int]],
        pixels: str = "float32",
        use_kernel: bool = True,
    ) -> None:
        if table.shape != (CHANNELS, 256) or table.dtype != np.float32:
            raise ValueError(f"table must be float32 of shape ({CHANNELS}, 256), got {table.dtype} {table.shape}")
        if pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.resample = resample
        self._smart_resize = smart_resize  # transformers' own: its float rounding and its refusals
        self.table = table
        self.pixels = pixels
        # preprocess.transport_dtype uint8: the processor's raw patches (run_processor(raw=True)), no table.
        self.raw = pixels == "uint8"
        # bfloat16: the table's floats rounded as torch rounds the processor's float32 (bfloat16_bits),
        # so each value is still written once, at half the bytes.
        self._pairs = _pair_table(bfloat16_bits(table) if pixels == "bfloat16" else table).reshape(-1)
        # Channel c's pair table starts at c * 65536 in the flat table.
        self._channel_base = (np.arange(CHANNELS, dtype=np.intp) << 16).reshape(1, CHANNELS, 1, 1)
        self._scratch = np.empty((CHUNK, CHANNELS, temporal_patch_size, patch_size * patch_size // 2), np.intp)
        # The compiled resize and patchify (preprocess.kernels) where built and proven; else numpy.
        self.kernel = kernels.kernel() if use_kernel else None
        # patchify's table: the bits of each output item per channel and uint8 value.
        if self.raw:
            self._items = np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (CHANNELS, 256)))
        elif pixels == "bfloat16":
            self._items = np.ascontiguousarray(bfloat16_bits(table))
        else:
            self._items = table.view(np.uint32)

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def for_processor(cls, processor: Any, *, pixels: str = "float32", use_kernel: bool = True) -> Qwen2VLFastPath:
        """The fast path for ``processor``, proven bit-identical on synthetic images; else ``NotCovered``.

        ``pixels`` (``preprocess.transport_dtype``): ``uint8`` writes what ``run_processor(processor,
        image, raw=True)`` returns, the uint8 patches (the same resize and patch order, no rescale or
        normalise); ``bfloat16`` the processor's float32 rounded (``bfloat16_bits``); each is proven so.
        ``use_kernel=False`` runs the numpy steps even where ``preprocess.kernels`` is available."""
        try:
            from transformers.models.qwen2_vl import (  # noqa: PLC0415 - heavy: only where processors are built
                image_processing_pil_qwen2_vl as qwen_pil,
            )
        except ImportError as exc:
            raise NotCovered(f"transformers' Qwen2-VL PIL processor is not importable: {exc}") from None
        kind = type(processor)
        if kind is not qwen_pil.Qwen2VLImageProcessorPil:
            raise NotCovered(f"{kind.__module__}.{kind.__qualname__} is not Qwen2VLImageProcessorPil")
        for flag in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize"):
            if getattr(processor, flag, None) is not True:
                raise NotCovered(f"{flag} is {getattr(processor, flag, None)!r}, the fast path needs True")
        size = processor.size
        ints = {
            "size.shortest_edge": getattr(size, "shortest_edge", None),
            "size.longest_edge": getattr(size, "longest_edge", None),
            "patch_size": processor.patch_size,
            "merge_size": processor.merge_size,
            "temporal_patch_size": processor.temporal_patch_size,
        }
        for key, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise NotCovered(f"{key} is {value!r}, the fast path needs a positive integer")
        patch = processor.patch_size
        if patch * patch % 2:
            raise NotCovered(f"patch_size {patch}: the pair gather needs an even number of pixels per patch")
        resample = table_path_filter(processor)
        fast = cls(
            table=value_table(processor),
            patch_size=patch,
            merge_size=processor.merge_size,
            temporal_patch_size=processor.temporal_patch_size,
            min_pixels=size.shortest_edge,
            max_pixels=size.longest_edge,
            resample=resample,
            smart_resize=qwen_pil.smart_resize,
            pixels=pixels,
            use_kernel=use_kernel,
        )
        fast._prove(processor)
        return fast

    def _prove(self, processor: Any) -> None:
        """Raise ``NotCovered`` unless this path and ``processor`` agree bit for bit on two synthetic images."""
        factor = self.patch_size * self.merge_size
        side = factor * max(1, math.ceil(math.sqrt(max(self.min_pixels, 256)) / factor))
        if self._smart_resize(side, side, factor, self.min_pixels, self.max_pixels) != (side, side):
            raise NotCovered(f"no square size smart_resize keeps (min_pixels {self.min_pixels}, max {self.max_pixels})")
        rng = np.random.default_rng(15)
        kept = rng.integers(0, 256, (side, side, CHANNELS), dtype=np.uint8)
        # Every value in every channel, each channel in its own order.
        flat = kept.reshape(-1, CHANNELS)
        for c in range(CHANNELS):
            flat[:256, c] = rng.permutation(256)
        resized = rng.integers(0, 256, (*reversed(_SELF_CHECK_ODD_SIZE), CHANNELS), dtype=np.uint8)
        for pixels in (kept, resized):
            image = Image.fromarray(pixels)
            expected = run_processor(processor, image, raw=self.raw)
            if self.pixels == "bfloat16":
                expected["pixel_values"] = bfloat16_bits(expected["pixel_values"])
            got = self.run(image)
            for name in ("pixel_values", "image_grid_thw"):
                ref, mine = np.asarray(expected[name]), got[name]
                if ref.dtype != mine.dtype or ref.shape != mine.shape or not np.array_equal(ref, mine):
                    raise SelfCheckFailed(f"self-check failed on a {image.width}x{image.height} image: {name} differs")

    # -- per image -----------------------------------------------------------------------------------

    @staticmethod
    def accepts(image: Image.Image) -> bool:
        """Whether this path takes ``image``: what ``processors.decode`` returns, a loaded RGB image."""
        return image.mode == "RGB" and image.info.get("transparency") is None

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the processor resizes a ``width`` x ``height`` image to; ValueError where it refuses."""
        factor = self.patch_size * self.merge_size
        return self._smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def output_shapes(self, width: int, height: int) -> Shapes:
        """Name -> (shape, dtype name) of the outputs for a ``width`` x ``height`` image, as the processor emits."""
        h, w = self.resized_size(width, height)
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        row = CHANNELS * self.temporal_patch_size * self.patch_size**2
        return {"pixel_values": ((grid_h * grid_w, row), self.pixels), "image_grid_thw": ((1, 3), "int64")}

    def run(self, image: Image.Image) -> dict[str, npt.NDArray[Any]]:
        """The outputs for ``image`` in new arrays (the worker uses ``write`` into the arena instead)."""
        shapes = self.output_shapes(image.width, image.height)
        outputs = {name: np.empty(shape, NUMPY_DTYPES[dtype]) for name, (shape, dtype) in shapes.items()}
        self.write(image, outputs)
        return outputs

    def write(self, image: Image.Image, outputs: Mapping[str, npt.NDArray[Any]]) -> None:
        """Fill ``outputs["pixel_values"]`` and ``outputs["image_grid_thw"]`` for ``image``.

        The arrays must be C-contiguous with ``output_shapes``' shapes and dtypes (checked): views
        over the extent, so the floats are written once, in place.
        """
        if not self.accepts(image):
            raise ValueError(f"the fast path takes RGB images without transparency, got mode {image.mode!r}")
        shapes = self.output_shapes(image.width, image.height)
        for name, (shape, dtype) in shapes.items():
            array = outputs[name]
            if array.shape != shape or array.dtype != NUMPY_DTYPES[dtype] or not array.flags.c_contiguous:
                raise ValueError(
                    f"{name}: need a C-contiguous {dtype} array of shape {shape}, got {array.dtype} {array.shape}"
                )
        h, w = self.resized_size(image.width, image.height)
        outputs["image_grid_thw"][0] = (1, h // self.patch_size, w // self.patch_size)
        if self.kernel is not None:
            self._write_compiled(self.kernel, image, w, h, outputs["pixel_values"])
            return
        if image.size != (w, h):
            image = image.resize((w, h), resample=self.resample, reducing_gap=None)
        patches = self._patch_order(image)
        if self.raw:
            # The patches themselves, each frame temporal_patch_size times: one broadcasting copy.
            count, size = patches.shape[0], self.patch_size * self.patch_size
            target = outputs["pixel_values"].reshape(count, CHANNELS, self.temporal_patch_size, size)
            np.copyto(target, patches.reshape(count, CHANNELS, 1, size))
        else:
            self._gather(patches, outputs["pixel_values"])

    def _write_compiled(self, kernel: Kernel, image: Image.Image, w: int, h: int, out: npt.NDArray[Any]) -> None:
        """The compiled steps: PIL's resize bit for bit (reading the image's own memory), then one
        pass writing every item of every patch, the temporal copies included."""
        pixels: object
        if image.size == (w, h):
            pixels, _alive = kernel.source(image)  # smart_resize kept the size: no copy at all
        elif self.resample in kernels.FILTERS:
            pixels = kernel.resize(image, w, h, self.resample)
        else:  # NEAREST: PIL's own call, then its memory
            image = image.resize((w, h), resample=self.resample, reducing_gap=None)
            pixels, _alive = kernel.source(image)
        kernel.patchify(
            pixels,
            w,
            h,
            out,
            self._items,
            patch=self.patch_size,
            merge=self.merge_size,
            temporal=self.temporal_patch_size,
        )

    def _patch_order(self, image: Image.Image) -> npt.NDArray[np.uint8]:
        """The (h, w) RGB image's pixels as (patches, 3, P, P) uint8, in the processor's patch order.

        Patch order is (grid_h / M, grid_w / M, M, M) and, inside a patch, (channel, row, column), as
        transformers' ``patchify`` transposes. Each channel comes out of PIL as its own plane (PIL's
        raw packer, one pass), then moves to patch order in one copy whose items are patch rows (P
        bytes): a few hundred thousand wide items at 1080p instead of millions of bytes.
        """
        p, m = self.patch_size, self.merge_size
        grid_h, grid_w = image.height // p, image.width // p
        patches = np.empty((grid_h * grid_w, CHANNELS, p, p), np.uint8)
        # (grid_h/M, grid_w/M, M, M, channel, row) of P-byte patch rows
        target = patches.reshape(grid_h // m, grid_w // m, m, m, CHANNELS, p, p).view(f"V{p}")[..., 0]
        for channel, band in enumerate(image.getbands()):
            plane = np.frombuffer(image.tobytes("raw", band), np.uint8)
            rows = plane.view(f"V{p}").reshape(grid_h // m, m, p, grid_w // m, m)
            np.copyto(target[..., channel, :], rows.transpose(0, 3, 1, 4, 2))
        return patches

    def _gather(self, patches: npt.NDArray[np.uint8], out: npt.NDArray[Any]) -> None:
        """Write the table's floats for ``patches`` into ``out``, each frame ``temporal_patch_size`` times."""
        count = patches.shape[0]
        half = self.patch_size * self.patch_size // 2
        # Two neighbouring pixels of a patch's channel block as one uint16: an index into the pair table.
        pairs = patches.reshape(count, CHANNELS, 1, half * 2).view(np.uint16)
        target = out.view(self._pairs.dtype).reshape(count, CHANNELS, self.temporal_patch_size, half)
        base, table, scratch = self._channel_base, self._pairs, self._scratch
        for start in range(0, count, CHUNK):
            stop = min(start + CHUNK, count)
            index = scratch[: stop - start]
            np.copyto(index, pairs[start:stop], casting="unsafe")  # widened, and repeated over the T frames
            index += base
            np.take(table, index, out=target[start:stop], mode="wrap")


def table_path_filter(processor: Any) -> int:
    """What every table fast path needs of a processor besides its own steps: a PIL resampling
    filter (returned) and a mean and std of one value per channel; else ``NotCovered``."""
    resample = processor.resample
    if isinstance(resample, bool) or not isinstance(resample, int) or int(resample) not in _FILTERS:
        raise NotCovered(f"resample {resample!r} is not a PIL resampling filter")
    for key in ("image_mean", "image_std"):
        value = getattr(processor, key, None)
        if not isinstance(value, list | tuple) or len(value) != CHANNELS:
            raise NotCovered(f"{key} {value!r}: the fast path needs {CHANNELS} values")
    return int(resample)


def value_table(processor: Any) -> npt.NDArray[np.float32]:
    """(3, 256) float32: what the processor's rescale then normalize make of each uint8 value per channel.

    Called exactly as its ``_preprocess`` calls them, on a (3, 1, 256) channels-first image.
    """
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (CHANNELS, 1, 256)).copy()
    rescaled = processor.rescale(values, processor.rescale_factor)
    normalized = processor.normalize(rescaled, processor.image_mean, processor.image_std)
    # patchify casts to float32 (np.asarray, a no-op for these float32 arrays)
    table = np.asarray(normalized, dtype=np.float32)
    if table.shape != (CHANNELS, 1, 256):
        raise NotCovered(f"rescale/normalize returned shape {table.shape} for a (3, 1, 256) image")
    return np.ascontiguousarray(table[:, 0, :])
