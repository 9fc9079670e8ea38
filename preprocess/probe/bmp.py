"""BMP header: the file header, the info header, its masks and its palette."""

from __future__ import annotations

import struct
from typing import Final

from .header import ImageHeader, ProbeError, _truncated, _zero_dimension

_BMP_INFO_SIZES: Final = frozenset({40, 52, 56, 64, 108, 124})


def _probe_bmp(buf: bytes, limit: int, count_frames: bool) -> ImageHeader:
    buf = buf[:limit]  # all header: the info header, its masks and its palette
    n = len(buf)
    if n < 18:
        raise _truncated("BMP", 26)
    (hsize,) = struct.unpack_from("<I", buf, 14)
    compression = 0
    colors = 0
    if hsize == 12:  # BITMAPCOREHEADER: unsigned 16-bit dimensions, RGB triples in the palette
        if n < 26:
            raise _truncated("BMP", 26)
        width, height, _planes, bits = struct.unpack_from("<HHHH", buf, 18)
        entry = 3
    elif hsize in _BMP_INFO_SIZES:
        if n < 54:
            raise _truncated("BMP", 54)
        width, height, _planes, bits, compression = struct.unpack_from("<iiHHI", buf, 18)
        (colors,) = struct.unpack_from("<I", buf, 46)
        entry = 4
        # Negative height means rows are stored top-down; the size is its magnitude.
        height = abs(height)
        if width < 0:
            raise ProbeError("corrupt BMP header (negative width)")
    else:
        raise ProbeError(f"unsupported BMP header size ({hsize})")
    if width == 0 or height == 0:
        raise _zero_dimension("BMP", width, height)
    if compression not in (0, 1, 2, 3):  # RGB, RLE8, RLE4, BITFIELDS: what PIL decodes
        raise ProbeError(f"unsupported BMP compression ({compression})")

    if bits in (1, 4, 8):
        mode = _bmp_palette_mode(buf, 14 + hsize, entry, colors or 1 << bits)
    elif bits in (16, 24):
        mode = "RGB"
    elif bits == 32:
        mode = "RGB"
        if compression == 3:
            # PIL decodes 32-bit BITFIELDS with a non-zero alpha mask (or all-zero masks) as RGBA.
            # The masks sit inside v2+ headers and right after a 40-byte header; only v3+ headers
            # have room for the alpha mask.
            masks_at = 14 + 40
            mask_count = 4 if hsize >= 56 else 3
            if masks_at + 4 * mask_count > n:
                raise _truncated("BMP", masks_at + 4 * mask_count)
            masks = struct.unpack_from(f"<{mask_count}I", buf, masks_at)
            if (mask_count == 4 and masks[3]) or not any(masks):
                mode = "RGBA"
    else:
        raise ProbeError(f"unsupported BMP bit depth ({bits})")
    return ImageHeader("BMP", width, height, mode, 1, 1)


def _bmp_palette_mode(buf: bytes, at: int, entry: int, colors: int) -> str:
    """PIL reports palette BMPs whose palette is an identity gray ramp as "1" or "L"."""
    if colors > 256:
        # Such a palette cannot be an identity ramp of byte values; PIL keeps it as "P". Not
        # reading it also keeps the read bounded.
        return "P"
    end = at + entry * colors
    if end > len(buf):
        raise _truncated("BMP", end)
    levels = (0, 255) if colors == 2 else range(colors)
    for i, level in enumerate(levels):
        off = at + i * entry
        if buf[off : off + 3] != bytes((level, level, level)):
            return "P"
    return "1" if colors <= 2 else "L"
