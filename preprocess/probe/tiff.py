"""TIFF header: the first IFD and the values it points to, then the IFD chain for the frame count.

The header is the first IFD, wherever the header's offset puts it; each further IFD in the chain is
a frame, as PIL counts them.

Where the result knowingly differs from what PIL reports after ``Image.open``: PIL's ``size``
already has the orientation tag applied; it equals ``display_size`` here.
"""

from __future__ import annotations

import struct
from typing import Final

from .header import ImageHeader, ProbeError, _truncated, _Walk, _zero_dimension

# TIFF field type -> byte size of one value, for the integer types a header field may use.
_TIFF_TYPE_SIZES: Final = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4}


def _probe_tiff(buf: bytes, limit: int, count_frames: bool) -> ImageHeader:
    n = len(buf)
    # The header is the first IFD and the values it points to, wherever the IFD offset says, and
    # must end by `limit`; the chain of further IFDs (frames) is followed over everything given.
    head_end = min(n, limit)
    if head_end < 8:
        raise _truncated("TIFF", 8)
    e = "<" if buf[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(e + "I", buf, 4)
    if ifd < 8:
        raise ProbeError("corrupt TIFF header (IFD offset inside header)")
    if ifd + 2 > head_end:
        raise _truncated("TIFF", ifd + 2)
    (count,) = struct.unpack_from(e + "H", buf, ifd)
    walk = _Walk("TIFF")
    walk.tick(count)  # every entry is read below: up to 65535, ~20 ms, if not bounded
    end = ifd + 2 + 12 * count
    if end > head_end:
        raise _truncated("TIFF", end)

    def first_value(entry: int) -> int | None:
        """First value of an integer field, inline or at its offset; None for other types."""
        typ, cnt = struct.unpack_from(e + "HI", buf, entry + 2)
        size = _TIFF_TYPE_SIZES.get(typ)
        if size is None or cnt == 0:
            return None
        at = entry + 8
        if size * cnt > 4:
            (at,) = struct.unpack_from(e + "I", buf, entry + 8)
            if at + size > head_end:
                raise _truncated("TIFF", at + size)
        fmt = {1: "B", 2: "H", 4: "I"}[size]
        if typ in (6, 8, 9):
            fmt = fmt.lower()
        (value,) = struct.unpack_from(e + fmt, buf, at)
        return int(value)

    fields: dict[int, int | None] = {}
    for i in range(count):
        entry = ifd + 2 + 12 * i
        (tag,) = struct.unpack_from(e + "H", buf, entry)
        # A repeated tag: the first one counts, as in PIL's IFD reader.
        if tag in (256, 257, 258, 259, 262, 274, 277) and tag not in fields:
            fields[tag] = first_value(entry)
    width, height = fields.get(256), fields.get(257)
    if width is None or height is None:
        raise ProbeError("TIFF header has no image width/height")
    if width <= 0 or height <= 0:
        raise _zero_dimension("TIFF", width, height)
    orientation = fields.get(274) or 1
    if not 1 <= orientation <= 8:
        orientation = 1
    mode = _tiff_mode(
        photometric=fields.get(262),
        samples=fields.get(277) or 1,
        bits=fields.get(258) or 1,
        compression=fields.get(259) or 1,
    )

    if not count_frames:
        return ImageHeader("TIFF", width, height, mode, None, orientation)
    # PIL counts every IFD in the chain as a frame; follow the next-IFD pointers the same way.
    # The visited set catches loops; the walk limit keeps that set small.
    frames: int | None = 1
    seen = {ifd}
    at = end
    while True:
        walk.tick()
        if at + 4 > n:
            frames = None
            break
        (nxt,) = struct.unpack_from(e + "I", buf, at)
        if nxt == 0:
            break
        if nxt in seen:
            raise ProbeError("corrupt TIFF (IFD chain loops)")
        seen.add(nxt)
        if nxt + 2 > n:
            frames = None
            break
        (cnt,) = struct.unpack_from(e + "H", buf, nxt)
        assert frames is not None
        frames += 1
        at = nxt + 2 + 12 * cnt
    return ImageHeader("TIFF", width, height, mode, frames, orientation)


def _tiff_mode(*, photometric: int | None, samples: int, bits: int, compression: int) -> str:
    """PIL's mode for common TIFF layouts; a guess by sample count for the rest."""
    if photometric in (0, 1):
        if samples >= 2:
            return "LA"
        return {1: "1", 16: "I;16", 32: "I"}.get(bits, "L")
    if photometric == 2:
        return "RGBA" if samples >= 4 else "RGB"
    if photometric == 3:
        return "PA" if samples >= 2 else "P"
    if photometric == 4:
        return "1"
    if photometric == 5:
        return "CMYK"
    if photometric == 6:
        # PIL lets libtiff convert JPEG-compressed YCbCr to RGB; raw YCbCr stays YCbCr.
        return "RGB" if compression == 7 else "YCbCr"
    if photometric == 8:
        return "LAB"
    return {1: "L", 2: "LA", 3: "RGB"}.get(samples, "RGBA")
