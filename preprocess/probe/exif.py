"""EXIF orientation, read from the TIFF-structured block that JPEG, PNG and WebP embed."""

from __future__ import annotations

import struct

from .sniff import _TIFF_SIGS


def _exif_orientation(tiff: bytes) -> int:
    """Orientation (1..8) from a TIFF-structured EXIF block; 1 on anything unexpected.

    EXIF is advisory, so a damaged block must not reject an otherwise decodable image.
    """
    if tiff.startswith(b"Exif\x00"):
        # JPEG APP1 and some WebP/PNG writers keep the "Exif\0\0" preamble; the TIFF data follows.
        tiff = tiff[6:]
    if len(tiff) < 8 or tiff[:4] not in _TIFF_SIGS:
        return 1
    e = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(e + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(e + "H", tiff, ifd)
    # Clamp the entry count to what is present: the block is at most the input's size.
    count = min(count, (len(tiff) - ifd - 2) // 12)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, typ, n = struct.unpack_from(e + "HHI", tiff, entry)
        if tag != 0x0112:
            continue
        if n != 1 or typ not in (3, 4):
            return 1
        (value,) = struct.unpack_from(e + ("H" if typ == 3 else "I"), tiff, entry + 8)
        return value if 1 <= value <= 8 else 1
    return 1
