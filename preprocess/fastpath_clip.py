"""Fast CLIP / SigLIP preprocessing bit-identical to transformers: resize, crop, one gather.

transformers' PIL-backend CLIP and SigLIP processors (``CLIPImageProcessorPil``,
``SiglipImageProcessorPil``, 5.x; both ``PilBackend._preprocess``) make a new array at every step:

1. ``convert_to_rgb`` (or ``np.array`` with ``do_convert_rgb`` off: the same for an RGB image):
   (H, W, 3) uint8, moved to a (3, H, W) view;
2. ``resize``: ``to_pil_image`` moves it back to (H, W, 3) and copies it into a new PIL image, then
   ``Image.resize((w, h), resample, reducing_gap=None)``: CLIP to the shortest edge (the long edge
   from ``get_resize_output_image_size``, truncated: 1920x1080 becomes 597x336), SigLIP to a fixed
   height and width; then ``np.array`` of the result, moved to (3, h, w);
3. ``center_crop`` (CLIP): a slice at top ``(h - crop_h) // 2``, left ``(w - crop_w) // 2`` (it pads
   with zeros where the crop is larger than the image);
4. ``rescale``: ``x.astype(float64) * rescale_factor``, cast to float32;
5. ``normalize``: ``(x - mean) / std`` in float32, per channel;
6. the batch: ``pixel_values`` (1, 3, crop_h, crop_w) float32 (SigLIP: (1, 3, h, w)).

Besides the resize, steps 1-2 copy the full-size image three times (convert, ``np.array``, the
transposing copy into a new PIL image): about 9 ms of the processor's 25 ms at 1080p. ``ClipFastPath``
instead:

* resize and crop: to the size transformers' own ``get_resize_output_image_size`` gives (so the
  truncation is theirs), PIL's fixed-point resampling on the same uint8 pixels, compiled bit for bit
  (``preprocess.kernels``), and only the centre crop's window of it: each output pixel depends on
  the source alone, so the window is that slice of the whole resize (1080p to 597x336, crop
  336x336: 56% of the columns). Without the compiled loops: PIL's ``Image.resize`` call on the
  decoded image itself, then the slice of its array. An image already at the target size is not
  resized (PIL would return a copy of it); no padding case (see coverage);
* rescale and normalize are elementwise per channel on uint8 inputs, so their float32 results form a
  3 x 256 table, computed once per processor by its own ``rescale`` and ``normalize``
  (``fastpath.value_table``); one gather per channel then writes each float once, in its final
  channel-first place in the destination (a view over the request's extent). No float image is ever
  materialised.

Coverage. ``ClipFastPath.for_processor`` takes a processor only when it is exactly
``CLIPImageProcessorPil`` or ``SiglipImageProcessorPil`` (a subclass may override any step) with
``do_resize``, ``do_rescale`` and ``do_normalize`` on and ``do_pad`` off, a size of only
``shortest_edge`` or only ``height`` and ``width``, a crop (``do_center_crop``, on or off) that fits
inside every resized image (so transformers never pads), a PIL resampling filter, and 3-channel
mean and std; ``do_convert_rgb`` may be either (the images it accepts are RGB already). It then
proves itself: it runs the processor and itself on synthetic images (one at a size the resize keeps,
with every value in every channel inside the crop, and for a shortest-edge resize the same size
transposed, so that both crop offsets are odd; one odd-sized and smaller, wide; one odd-sized and
larger, tall) and accepts only bit-identical outputs. ``pixels="uint8"`` (raw transport) is refused:
the engines normalise uint8 only for the Qwen2-VL family; ``"bfloat16"`` writes the float32 table
rounded (``processors.bfloat16_bits``), proven against the processor's output rounded the same way.
Anything else raises ``NotCovered`` with the reason, and the caller runs transformers. Per image,
``accepts`` takes only what ``processors.decode`` returns (a loaded "RGB" image without a
``transparency`` entry).

Speed (``bench/preprocess_throughput.py``, one core, decode included): about 2.9x transformers at
720p and 3.0x at 1080p for llava-1.5, 2.3x and 2.6x for SigLIP. The JPEG decode, the same call in
both, is three quarters of the fast path (1080p: decode ~17 ms, the windowed resize ~3.5 ms, crop
and gather under 1 ms), so decode alone bounds it near 3.7-4.2x. With PIL's own resize (no compiled
loops): about 1.3-1.6x, the resize then being most of it.

transformers is imported inside ``for_processor`` only: importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from . import kernels
from .fastpath import CHANNELS, NotCovered, SelfCheckFailed, Shapes, table_path_filter, value_table
from .processors import bfloat16_bits, run_processor
from .protocol import NUMPY_DTYPES

__all__ = ["ClipFastPath"]

_PIXELS: Final[tuple[str, ...]] = ("float32", "bfloat16")  # the preprocess.transport_dtype values covered

# (width, height) of the self-check's resized images: odd, one wide and smaller than any target, one
# tall and larger, so both crop offsets are odd and both resize directions run.
_SELF_CHECK_SMALL: Final[tuple[int, int]] = (97, 61)
_SELF_CHECK_LARGE: Final[tuple[int, int]] = (587, 1031)


class ClipFastPath:
    """CLIP / SigLIP preprocessing, bit-identical to the processor it was built from.

    Build with ``for_processor``. ``output_shapes`` gives the output's shape for an image size;
    ``write`` fills a caller-provided array of that shape (a view into the arena); ``run`` allocates
    it (tests, benchmarks).
    """

    def __init__(
        self,
        *,
        table: npt.NDArray[np.float32],
        resample: int,
        shortest_edge: int | None = None,
        resize_hw: tuple[int, int] | None = None,
        crop_hw: tuple[int, int] | None = None,
        resize_output_size: Callable[..., tuple[int, int]],
        pixels: str = "float32",
        use_kernel: bool = True,
    ) -> None:
        if table.shape != (CHANNELS, 256) or table.dtype != np.float32:
            raise ValueError(f"table must be float32 of shape ({CHANNELS}, 256), got {table.dtype} {table.shape}")
        if pixels not in _PIXELS:
            raise ValueError(f"pixels must be one of {', '.join(_PIXELS)}, got {pixels!r}")
        if (shortest_edge is None) == (resize_hw is None):
            raise ValueError("give exactly one of shortest_edge and resize_hw")
        self.table = table
        self.pixels = pixels
        # bfloat16: the table's floats rounded as torch rounds the processor's float32 (bfloat16_bits).
        self._values = bfloat16_bits(table) if pixels == "bfloat16" else table
        self.resample = resample
        self.shortest_edge = shortest_edge
        self.resize_hw = resize_hw
        self.crop_hw = crop_hw
        # transformers' get_resize_output_image_size: its float arithmetic and its truncation
        self._resize_output_size = resize_output_size
        # PIL's resize, compiled and proven (preprocess.kernels), where built; else PIL's own call.
        self.kernel = kernels.kernel() if use_kernel and resample in kernels.FILTERS else None

    # -- building ----------------------------------------------------------------------------------

    @classmethod
    def for_processor(cls, processor: Any, *, pixels: str = "float32", use_kernel: bool = True) -> ClipFastPath:
        """The fast path for ``processor``, proven bit-identical on synthetic images; else ``NotCovered``.

        ``pixels`` (``preprocess.transport_dtype``): ``float32``, the processor's output; ``bfloat16``,
        that rounded (``bfloat16_bits``), proven so; ``uint8`` is not covered. ``use_kernel=False``
        resizes with PIL's own call even where ``preprocess.kernels`` is available."""
        try:
            from transformers.image_transforms import (  # noqa: PLC0415 - heavy: only where processors are built
                get_resize_output_image_size,
            )
            from transformers.image_utils import ChannelDimension  # noqa: PLC0415
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: PLC0415
            from transformers.models.siglip.image_processing_pil_siglip import (  # noqa: PLC0415
                SiglipImageProcessorPil,
            )
        except ImportError as exc:
            raise NotCovered(f"transformers' CLIP / SigLIP PIL processors are not importable: {exc}") from None
        kind = type(processor)
        if kind is not CLIPImageProcessorPil and kind is not SiglipImageProcessorPil:
            raise NotCovered(
                f"{kind.__module__}.{kind.__qualname__} is not CLIPImageProcessorPil or SiglipImageProcessorPil"
            )
        if pixels == "uint8":
            raise NotCovered("uint8 transport (raw pixels) is only for the Qwen2-VL family")
        if pixels not in _PIXELS:
            raise ValueError(f"pixels must be one of float32, bfloat16, uint8, got {pixels!r}")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if getattr(processor, flag, None) is not True:
                raise NotCovered(f"{flag} is {getattr(processor, flag, None)!r}, the fast path needs True")
        if getattr(processor, "do_pad", None):
            raise NotCovered(f"do_pad is {processor.do_pad!r}, the fast path needs it off")
        size = processor.size
        sizes = {key: getattr(size, key, None) for key in ("height", "width", "shortest_edge", "longest_edge")}
        sizes.update({key: getattr(size, key, None) for key in ("max_height", "max_width")})
        given = {key for key, value in sizes.items() if value is not None}
        if given not in ({"shortest_edge"}, {"height", "width"}):
            raise NotCovered(f"size {sorted(given)}: the fast path needs only shortest_edge, or height and width")
        checked = {key: _positive(f"size.{key}", sizes[key]) for key in given}
        shortest_edge = checked.get("shortest_edge")
        resize_hw = None if shortest_edge is not None else (checked["height"], checked["width"])
        crop_hw = None
        if processor.do_center_crop:
            crop = processor.crop_size
            crop_hw = (
                _positive("crop_size.height", getattr(crop, "height", None)),
                _positive("crop_size.width", getattr(crop, "width", None)),
            )
            # A shortest-edge resize gives both sides >= the edge, a fixed one exactly its size.
            least = resize_hw or (shortest_edge or 0, shortest_edge or 0)
            if crop_hw[0] > least[0] or crop_hw[1] > least[1]:
                raise NotCovered(f"crop_size {crop_hw} can exceed the resized image {least}: transformers pads there")
        resample = table_path_filter(processor)

        def resize_output_size(height: int, width: int, edge: int) -> tuple[int, int]:
            # The helper reads only the array's shape: a broadcast view allocates nothing.
            shape = np.broadcast_to(np.zeros((), np.uint8), (CHANNELS, height, width))
            out = get_resize_output_image_size(
                shape, size=edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
            return int(out[0]), int(out[1])

        fast = cls(
            table=value_table(processor),
            resample=resample,
            shortest_edge=shortest_edge,
            resize_hw=resize_hw,
            crop_hw=crop_hw,
            resize_output_size=resize_output_size,
            pixels=pixels,
            use_kernel=use_kernel,
        )
        fast._prove(processor)
        return fast

    def _prove(self, processor: Any) -> None:
        """Raise ``NotCovered`` unless this path and ``processor`` agree bit for bit on synthetic images."""
        rng = np.random.default_rng(15)
        if self.resize_hw is not None:
            kept_h, kept_w = self.resize_hw
        else:
            edge = self.shortest_edge
            assert edge is not None  # one of the two, checked in __init__
            kept_h, kept_w = edge, edge + 5  # an odd margin (5): the crop offset rounds down, 2 and not 3
        if self.resized_size(kept_w, kept_h) != (kept_h, kept_w):
            raise NotCovered(f"the resize does not keep a {kept_w}x{kept_h} image")
        crop_h, crop_w = self.crop_hw or (kept_h, kept_w)
        top, left = (kept_h - crop_h) // 2, (kept_w - crop_w) // 2
        area = crop_h * crop_w
        perms = np.stack([rng.permutation(256).astype(np.uint8) for _ in range(CHANNELS)], axis=-1)
        images = []
        # Every value in every channel, inside the crop window: one image per `area` values.
        for start in range(0, 256, area):
            pixels = rng.integers(0, 256, (kept_h, kept_w, CHANNELS), dtype=np.uint8)
            window = np.resize(np.roll(perms, -start, axis=0), (area, CHANNELS))
            pixels[top : top + crop_h, left : left + crop_w] = window.reshape(crop_h, crop_w, CHANNELS)
            images.append(pixels)
        sizes = [_SELF_CHECK_SMALL, _SELF_CHECK_LARGE]
        if self.shortest_edge is not None:
            sizes.append((kept_h, kept_w))  # kept too, transposed: the crop's top offset is odd
        for width, height in sizes:
            images.append(rng.integers(0, 256, (height, width, CHANNELS), dtype=np.uint8))
        for pixels in images:
            image = Image.fromarray(pixels)
            ref, mine = np.asarray(run_processor(processor, image)["pixel_values"]), self.run(image)["pixel_values"]
            if self.pixels == "bfloat16":
                ref = bfloat16_bits(ref)
            if ref.dtype != mine.dtype or ref.shape != mine.shape or not np.array_equal(ref, mine):
                raise SelfCheckFailed(
                    f"self-check failed on a {image.width}x{image.height} image: pixel_values differs"
                )

    # -- per image -----------------------------------------------------------------------------------

    @staticmethod
    def accepts(image: Image.Image) -> bool:
        """Whether this path takes ``image``: what ``processors.decode`` returns, a loaded RGB image."""
        return image.mode == "RGB" and image.info.get("transparency") is None

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the processor resizes a ``width`` x ``height`` image to, before any crop."""
        if self.resize_hw is not None:
            return self.resize_hw
        assert self.shortest_edge is not None
        return self._resize_output_size(height, width, self.shortest_edge)

    def crop_window(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centre crop in the resized ``width`` x ``height`` image,
        at ``center_crop``'s offsets (rounded down); the whole resized image where there is no crop."""
        h, w = self.resized_size(width, height)
        crop_h, crop_w = self.crop_hw or (h, w)
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        return left, top, left + crop_w, top + crop_h

    def output_shapes(self, width: int, height: int) -> Shapes:
        """Name -> (shape, dtype name) of the output for a ``width`` x ``height`` image, as the processor emits."""
        h, w = self.crop_hw or self.resized_size(width, height)
        return {"pixel_values": ((1, CHANNELS, h, w), self.pixels)}

    def run(self, image: Image.Image) -> dict[str, npt.NDArray[Any]]:
        """The output for ``image`` in a new array (the worker uses ``write`` into the arena instead)."""
        shapes = self.output_shapes(*image.size)
        outputs = {name: np.empty(shape, NUMPY_DTYPES[dtype]) for name, (shape, dtype) in shapes.items()}
        self.write(image, outputs)
        return outputs

    def write(self, image: Image.Image, outputs: Mapping[str, npt.NDArray[Any]]) -> None:
        """Fill ``outputs["pixel_values"]`` for ``image``: C-contiguous, of ``output_shapes``' shape and
        dtype (checked), a view over the extent, so each float is written once, in place."""
        if not self.accepts(image):
            raise ValueError(f"the fast path takes RGB images without transparency, got mode {image.mode!r}")
        ((shape, dtype),) = self.output_shapes(image.width, image.height).values()
        out = outputs["pixel_values"]
        if out.shape != shape or out.dtype != NUMPY_DTYPES[dtype] or not out.flags.c_contiguous:
            raise ValueError(
                f"pixel_values: need a C-contiguous {dtype} array of shape {shape}, got {out.dtype} {out.shape}"
            )
        h, w = self.resized_size(image.width, image.height)
        window = left, top, right, bottom = self.crop_window(image.width, image.height)
        crop_h, crop_w = shape[2], shape[3]
        pixels: npt.NDArray[np.uint8]  # (crop_h, crop_w, 3 or 4) uint8
        if image.size != (w, h) and self.kernel is not None:
            # only the crop is resized: (crop_h, crop_w, 4), R, G, B, pad
            pixels = self.kernel.resize(image, w, h, self.resample, window)
        else:
            if image.size != (w, h):
                image = image.resize((w, h), resample=self.resample, reducing_gap=None)
            pixels = np.asarray(image)[top:bottom, left:right]
        planes = out.reshape(CHANNELS, crop_h, crop_w)
        for channel in range(CHANNELS):
            # uint8 indices are always in range: "clip" skips take's bounds check and buffering.
            np.take(self._values[channel], pixels[..., channel], out=planes[channel], mode="clip")


def _positive(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NotCovered(f"{key} is {value!r}, the fast path needs a positive integer")
    return value
