"""Exact processor output shapes and byte counts from an image's size alone, without running it.

Admission reserves arena bytes before any pixel is decoded, so the reservation must equal what the
processor will produce, not estimate it. This module reproduces the geometry of the transformers
5.x PIL-backend processors for the families ``ProcessorSpec`` describes, from the header's size
after the decode policy (``probe.ImageHeader.display_size``: EXIF orientation applied):

* "qwen2_vl" (Qwen2-VL, Qwen2.5-VL): ``smart_resize`` exactly as
  ``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize`` computes it
  (Python's round-half-even ``round``, ``floor`` above ``max_pixels``, ``ceil`` below
  ``min_pixels``), and the same refusal: an aspect ratio above 200 raises, as a ``CostError``.
  transformers 5.24 has no "image too small" error (older ``qwen-vl-utils`` had one): a 1x1 image
  is scaled up to ``min_pixels``. A single image is one temporal patch (``grid_t = 1``; the frame
  is repeated ``temporal_patch_size`` times inside each patch row), so ``pixel_values`` is
  ``(grid_h * grid_w, channels * temporal_patch_size * patch_size**2)`` float32 and
  ``image_grid_thw`` is ``(1, 3)`` int64.
* "clip" / "siglip": resize (fixed height/width, or shortest edge with the long edge truncated
  like transformers' ``get_resize_output_image_size``), then an optional center crop, which always
  yields the crop size (it pads when the image is smaller). ``pixel_values`` is
  ``(1, channels, H, W)`` float32.

Only byte counts of the outputs are predicted here. The processors' intermediates can be far
larger: a CLIP shortest-edge resize of a 1x8000 image allocates a 336 x 2,688,000 image before the
crop. Bounding those is the caller's job (aspect-ratio and pixel limits on the header).

Pure arithmetic: imports nothing heavy, safe to call on the event loop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

from .extents import pack_tensors

if TYPE_CHECKING:
    from .processors import ProcessorSpec

__all__ = ["DTYPE_SIZES", "MAX_ASPECT_RATIO", "CostError", "output_nbytes", "output_shapes", "smart_resize"]

# dtype name -> itemsize, for the dtypes the supported processors emit and the transport dtypes
# (preprocess.transport_dtype) pixel_values travel in.
DTYPE_SIZES: Final[dict[str, int]] = {"float32": 4, "bfloat16": 2, "int64": 8, "uint8": 1}

# smart_resize refuses max(h, w) / min(h, w) above this (strictly above: exactly 200 passes).
MAX_ASPECT_RATIO: Final[int] = 200

Shapes = dict[str, tuple[tuple[int, ...], str]]


class CostError(ValueError):
    """The processor would refuse an image of this size (or the size is invalid); a retry cannot help."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the Qwen2-VL processor resizes an image to; ``CostError`` where it raises.

    Operation for operation the transformers 5.24 function, so float rounding matches too.
    """
    if height < 1 or width < 1:
        raise CostError(f"image size must be positive, got {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise CostError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _required(value: int | None, field: str, spec: ProcessorSpec) -> int:
    if value is None:
        raise CostError(f"processor spec for {spec.processor_type} lacks {field}")
    return value


def _qwen2_vl_shapes(spec: ProcessorSpec, width: int, height: int) -> Shapes:
    patch = _required(spec.patch_size, "patch_size", spec)
    merge = _required(spec.merge_size, "merge_size", spec)
    temporal = _required(spec.temporal_patch_size, "temporal_patch_size", spec)
    resized_h, resized_w = smart_resize(
        height,
        width,
        factor=patch * merge,
        min_pixels=_required(spec.min_pixels, "min_pixels", spec),
        max_pixels=_required(spec.max_pixels, "max_pixels", spec),
    )
    grid_t, grid_h, grid_w = 1, resized_h // patch, resized_w // patch
    return {
        "pixel_values": ((grid_t * grid_h * grid_w, spec.channels * temporal * patch * patch), spec.pixel_dtype),
        "image_grid_thw": ((1, 3), "int64"),
    }


def _resize_crop_shapes(spec: ProcessorSpec, width: int, height: int) -> Shapes:
    out_h, out_w = height, width
    if spec.do_resize:
        if spec.resize_hw is not None:
            out_h, out_w = spec.resize_hw
        else:
            edge = _required(spec.shortest_edge, "shortest_edge", spec)
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)  # transformers truncates, it does not round
            out_h, out_w = (new_long, edge) if width <= height else (edge, new_long)
    if spec.crop_hw is not None:
        out_h, out_w = spec.crop_hw
    return {"pixel_values": ((1, spec.channels, out_h, out_w), spec.pixel_dtype)}


def output_shapes(spec: ProcessorSpec, width: int, height: int) -> Shapes:
    """Name -> (shape, numpy dtype name) of every processor output for a ``width`` x ``height`` image.

    ``width``/``height`` are the size after the decode policy (``display_size``). Raises
    ``CostError`` for sizes the processor would refuse.
    """
    if width < 1 or height < 1:
        raise CostError(f"image size must be positive, got {width}x{height}")
    if spec.family == "qwen2_vl":
        return _qwen2_vl_shapes(spec, width, height)
    if spec.family in ("clip", "siglip"):
        return _resize_crop_shapes(spec, width, height)
    raise CostError(f"no cost model for processor family {spec.family!r}")


def output_nbytes(spec: ProcessorSpec, width: int, height: int) -> int:
    """Bytes of all outputs for one image as the worker packs them into its extent (each tensor
    aligned, `extents.pack_tensors`): what the arena must hold for it. uint8 pixel_values are not a
    multiple of the alignment, so the padding before image_grid_thw counts."""
    sizes = [math.prod(shape) * DTYPE_SIZES[dtype] for shape, dtype in output_shapes(spec, width, height).values()]
    return pack_tensors(sizes)[1]
