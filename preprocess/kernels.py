"""The fast paths' compiled loops (``preprocess/_kernels.c``), proven against PIL before first use.

Two steps of the fast paths cost more in numpy and PIL than everything else after the decode:

* the resize. transformers resizes with PIL, whose 8-bit resampling is fixed-point integer
  arithmetic in scalar loops (1080p to Qwen2-VL's 1932x1092: ~30-50 ms on one core here, more than
  the decode). ``resize`` runs the same arithmetic, bit for bit, 8 lanes at a time (AVX2), reading
  the decoded image's own memory through Pillow's Arrow export (no copy);
* Qwen2-VL's patch order and value table: ``patchify`` writes each value of each patch once, mapped
  through the processor's own rescale + normalize table, straight into the destination (the arena
  extent), the temporal copies included.

Trust, but verify: the C code copies Pillow's coefficient arithmetic, and Pillow's results differ
between versions (Pillow 13 runs the vertical pass first when the height shrinks most, which
changes the 8-bit intermediate). Before first use, ``kernel`` resizes synthetic images with every
filter, in both pass orders' cases, both ways, and takes the compiled loops only if they equal the
installed PIL's own ``Image.resize`` bit for bit; the fast paths then prove their whole outputs
against the transformers processor as before. Where the module did not build (no compiler) or the
check fails, ``kernel()`` is None, the reason is in ``unavailable()``, and the fast paths run their
numpy steps, with the same outputs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import PIL
from PIL import Image
from PIL import _imaging as pil_core  # Image.core

__all__ = ["Kernel", "kernel", "unavailable"]

log = logging.getLogger(__name__)

# PIL's convolution filters (not NEAREST, which PIL does not resample, nor Pillow 13's MKS filters).
FILTERS: Final[frozenset[int]] = frozenset(
    int(f)
    for f in (
        Image.Resampling.LANCZOS,
        Image.Resampling.BILINEAR,
        Image.Resampling.BICUBIC,
        Image.Resampling.BOX,
        Image.Resampling.HAMMING,
    )
)
BLOCK_SIZE: Final[int] = 1 << 28  # Pillow's image block size in processes that load the kernels (``_load``)
# (source, target) sizes of the self-check: up and down in each direction, the height shrinking
# more than twice the width (Pillow 13's vertical-first case) and less, widths that leave the AVX2
# loops a scalar edge, and a 1-pixel side.
_CHECK_SIZES: Final[tuple[tuple[tuple[int, int], tuple[int, int]], ...]] = (
    ((61, 47), (97, 83)),
    ((97, 83), (61, 47)),
    ((64, 90), (70, 20)),
    ((90, 40), (33, 37)),
    ((40, 90), (41, 9)),
    ((33, 1), (67, 3)),
    ((29, 31), (29, 17)),
    ((29, 31), (13, 31)),
)


class Kernel:
    """The compiled loops, once proven equal to PIL (``kernel()`` builds the one instance)."""

    def __init__(self, module: Any, order: int) -> None:
        self._module = module
        self.order = order  # 13: Pillow 13's pass order; 0: earlier Pillows'
        self.simd: str = module.simd()

    @staticmethod
    def source(image: Image.Image) -> tuple[object, object]:
        """(pixels, keep-alive) of a loaded RGB image, 4 bytes per pixel: Pillow's Arrow export of the
        image's memory where it is one block (no copy), else a copy (``tobytes``)."""
        try:
            schema, array = image.__arrow_c_array__()
        except (AttributeError, ValueError):  # Pillow < 11.2, or an image in several blocks
            data = image.tobytes("raw", "RGBX")
            return data, data
        return array, (schema, array)

    def resize(
        self,
        image: Image.Image,
        width: int,
        height: int,
        resample: int,
        window: tuple[int, int, int, int] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """``image.resize((width, height), resample, reducing_gap=None)`` as (height, width, 4) uint8
        (R, G, B, pad: PIL's own layout of an RGB image), bit-identical to it; with ``window``
        (left, top, right, bottom), only that part of it (the crop of the full resize, computed alone)."""
        if resample not in FILTERS:
            raise ValueError(f"resample {resample!r}: the kernel resamples with {sorted(FILTERS)}")
        left, top, right, bottom = window or (0, 0, width, height)
        if self.simd == "scalar":
            # Without AVX2 (another CPU, another architecture) the compiled loops are Pillow's own
            # scalar ones, measured 1.7x slower than Pillow's build: PIL resizes, the same bits.
            resized = image.resize((width, height), resample, reducing_gap=None)
            whole = np.frombuffer(resized.tobytes("raw", "RGBX"), np.uint8).reshape(height, width, 4)
            return whole[top:bottom, left:right]
        out = np.empty((bottom - top, right - left, 4), np.uint8)
        pixels, _alive = self.source(image)
        self._module.resample(
            pixels, image.width, image.height, out, width, height, resample, self.order, (left, top, right, bottom)
        )
        return out

    def patchify(
        self,
        pixels: object,
        width: int,
        height: int,
        out: npt.NDArray[Any],
        table: npt.NDArray[Any],
        *,
        patch: int,
        merge: int,
        temporal: int,
    ) -> None:
        """Write Qwen2-VL's patches of ``pixels`` (4 bytes per pixel: ``resize``'s output, or a
        ``source``) into ``out`` through ``table`` ((3, 256) items of ``out``'s item size)."""
        if table.shape != (3, 256) or table.dtype.itemsize != out.dtype.itemsize or not table.flags.c_contiguous:
            raise ValueError(f"table: need C-contiguous (3, 256) items of {out.dtype.itemsize} bytes")
        self._module.patchify(pixels, width, height, out, table, out.dtype.itemsize, patch, merge, temporal)


def _check(module: Any, order: int) -> str | None:
    """None if the compiled resample equals PIL's on the check images (SIMD and scalar), else why not."""
    rng = np.random.default_rng(4687)
    for simd in (False, True):
        module.set_simd(simd)
        try:
            for (sw, sh), (dw, dh) in _CHECK_SIZES:
                image = Image.fromarray(rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8))
                data = image.tobytes("raw", "RGBX")
                for resample in sorted(FILTERS):
                    expected = np.asarray(image.resize((dw, dh), resample, reducing_gap=None))
                    got = np.empty((dh, dw, 4), np.uint8)
                    module.resample(data, sw, sh, got, dw, dh, resample, order, (0, 0, dw, dh))
                    # and a window inside it, as a center crop asks
                    box = (dw // 3, dh // 4, dw - dw // 5, dh - dh // 3)
                    part = np.empty((box[3] - box[1], box[2] - box[0], 4), np.uint8)
                    module.resample(data, sw, sh, part, dw, dh, resample, order, box)
                    if not np.array_equal(got[..., :3], expected) or not np.array_equal(
                        part[..., :3], expected[box[1] : box[3], box[0] : box[2]]
                    ):
                        return f"{sw}x{sh} -> {dw}x{dh} filter {resample} ({module.simd()}) differs from PIL's"
        finally:
            module.set_simd(True)
    return None


@functools.cache
def _load() -> tuple[Kernel | None, str]:
    """The kernel and '' (cached: built and proven once per process), or None and why not (logged once)."""
    try:
        from . import _kernels  # noqa: PLC0415 - compiled; optional (setup.py)
    except ImportError as exc:
        reason = f"preprocess._kernels is not built: {exc}"
    else:
        # Pillow allocates an image in blocks of at most this many bytes (16 MiB by default: a 12 MP
        # RGB image is three), and exports only one-block images through Arrow; a larger block lets
        # the kernels read any image up to 64 MP in place instead of copying it (35-40 ms at 12 MP).
        # Each image still gets only the bytes it needs (the arena keeps no freed blocks by default).
        pil_core.set_block_size(max(pil_core.get_block_size(), BLOCK_SIZE))
        # Pillow's version picks the order to try first; the check decides.
        major = int(PIL.__version__.split(".")[0])
        reasons = []
        for order in (13, 0) if major >= 13 else (0, 13):
            failed = _check(_kernels, order)
            if failed is None:
                return Kernel(_kernels, order), ""
            reasons.append(f"order {order}: {failed}")
        reason = f"preprocess._kernels does not match PIL {PIL.__version__}: " + "; ".join(reasons)
    log.warning("fast paths run numpy and PIL steps: %s", reason)
    return None, reason


def kernel() -> Kernel | None:
    """The proven compiled loops, or None (``unavailable()`` says why)."""
    return _load()[0]


def unavailable() -> str:
    """Why ``kernel()`` is None ('' when it is not)."""
    return _load()[1]
