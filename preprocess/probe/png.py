"""PNG header: IHDR, then the chunks up to the first IDAT (acTL for the frame count, eXIf).

The header ends at the first IDAT, before which PIL honours every IHDR. A second IHDR before that
point is refused: the probe would price one size and PIL decode another.

Where the result knowingly differs from what PIL reports after ``Image.open``: an eXIf chunk after
the first IDAT is not read (PIL finds it on load).
"""

from __future__ import annotations

import struct
from typing import Final

from .exif import _exif_orientation
from .header import ImageHeader, NeedMoreData, ProbeError, _truncated, _Walk, _zero_dimension

# (bit depth, color type) -> PIL mode, as PIL's PngImagePlugin maps them.
_PNG_MODES: Final = {
    (1, 0): "1",
    (2, 0): "L",
    (4, 0): "L",
    (8, 0): "L",
    (16, 0): "I;16",
    (8, 2): "RGB",
    (16, 2): "RGB",
    (1, 3): "P",
    (2, 3): "P",
    (4, 3): "P",
    (8, 3): "P",
    (8, 4): "LA",
    (16, 4): "RGBA",
    (8, 6): "RGBA",
    (16, 6): "RGBA",
}
_PNG_IHDR_END: Final = 8 + 8 + 13  # signature, IHDR length+type, IHDR data
# The chunks where PIL's open stops reading headers (IEND: a file without image data, refused on load).
_PNG_IMAGE_DATA: Final = frozenset({b"IDAT", b"fdAT", b"IEND"})


def _probe_png(buf: bytes, limit: int, count_frames: bool) -> ImageHeader:
    # Everything up to the first IDAT is header (see the module docstring).
    buf = buf[:limit]
    n = len(buf)
    if n < 16:
        raise _truncated("PNG", _PNG_IHDR_END)
    length, ctype = struct.unpack_from(">I4s", buf, 8)
    if ctype != b"IHDR":
        raise ProbeError("corrupt PNG (first chunk is not IHDR)")
    if length != 13:
        raise ProbeError("corrupt PNG IHDR chunk")
    if n < _PNG_IHDR_END:
        raise _truncated("PNG", _PNG_IHDR_END)
    width, height, depth, color = struct.unpack_from(">IIBB", buf, 16)
    if width == 0 or height == 0:
        raise _zero_dimension("PNG", width, height)
    mode = _PNG_MODES.get((depth, color))
    if mode is None:
        raise ProbeError(f"unsupported PNG bit depth {depth} with color type {color}")

    # Walk the chunks up to the first IDAT, as PIL's open does: acTL (APNG) must precede it,
    # eXIf is read there too, and a second IHDR would replace the size PIL decodes. eXIf after
    # IDAT (which PIL also honours on load) is not looked for: it would need the whole file.
    walk = _Walk("PNG")
    orientation = 1
    exif_seen = False
    actl_frames: int | None = None

    def truncated(need: int) -> NeedMoreData:
        return _truncated("PNG", need, ImageHeader("PNG", width, height, mode, None, orientation))

    pos = _PNG_IHDR_END + 4  # skip the IHDR CRC
    while True:
        walk.tick()
        if pos + 8 > n:
            raise truncated(pos + 8)
        length, ctype = struct.unpack_from(">I4s", buf, pos)
        if length > 0x7FFFFFFF:
            raise ProbeError("corrupt PNG chunk length")
        if ctype in _PNG_IMAGE_DATA:
            break
        if ctype == b"IHDR":
            raise ProbeError("PNG has more than one IHDR chunk")
        data_end = pos + 8 + length
        if ctype == b"acTL":
            if length < 8:
                raise ProbeError("corrupt PNG acTL chunk")
            if pos + 12 > n:
                raise truncated(pos + 12)
            # Mirror PIL: a repeated acTL invalidates the animation, an implausible count is
            # ignored; either way the file falls back to its default image.
            if actl_frames is not None:
                actl_frames = None
            else:
                (num,) = struct.unpack_from(">I", buf, pos + 8)
                if 0 < num <= 0x80000000:
                    actl_frames = num
        elif ctype == b"eXIf" and not exif_seen:
            if data_end > n:
                raise truncated(data_end)
            exif_seen = True
            orientation = _exif_orientation(buf[pos + 8 : data_end])
        pos = data_end + 4  # chunk CRC; not checked, the decoder will
    return ImageHeader("PNG", width, height, mode, actl_frames or 1, orientation)
