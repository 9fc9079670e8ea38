"""WebP header: the first chunk (VP8, VP8L or VP8X), then for VP8X the chunks for frames and EXIF.

The header ends with the first chunk's fixed fields.

Where the result knowingly differs from what PIL reports after ``Image.open``: ``mode`` follows the
VP8X alpha flag; PIL follows the bitstream. (A VP8X canvas that differs from its bitstream's size
is refused by libwebp at open, so sizes cannot disagree.)
"""

from __future__ import annotations

import struct

from .exif import _exif_orientation
from .header import ImageHeader, ProbeError, _truncated, _Walk, _zero_dimension


def _probe_webp(buf: bytes, limit: int, count_frames: bool) -> ImageHeader:
    n = len(buf)
    # The header is the first chunk's fixed fields and must end by `limit`; the chunk walk after
    # it (frames, EXIF) reads everything given.
    head_end = min(n, limit)
    if head_end < 20:
        raise _truncated("WEBP", 25)  # the shortest complete header is VP8L's
    (riff_size,) = struct.unpack_from("<I", buf, 4)
    riff_end = 8 + riff_size
    fourcc, size = struct.unpack_from("<4sI", buf, 12)
    if fourcc == b"VP8 ":
        if head_end < 30:
            raise _truncated("WEBP", 30)
        # Frame tag (3 bytes), then the key frame start code and 14-bit dimensions (+2 bits scale).
        if buf[20] & 1 or buf[23:26] != b"\x9d\x01\x2a":
            raise ProbeError("corrupt WebP VP8 frame header")
        w, h = struct.unpack_from("<HH", buf, 26)
        width, height = w & 0x3FFF, h & 0x3FFF
        if width == 0 or height == 0:
            raise _zero_dimension("WEBP", width, height)
        return ImageHeader("WEBP", width, height, "RGB", 1, 1)
    if fourcc == b"VP8L":
        if head_end < 25:
            raise _truncated("WEBP", 25)
        if buf[20] != 0x2F:
            raise ProbeError("corrupt WebP VP8L header")
        (bits,) = struct.unpack_from("<I", buf, 21)
        if bits >> 29:
            raise ProbeError("unsupported WebP VP8L version")
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
        mode = "RGBA" if bits >> 28 & 1 else "RGB"
        return ImageHeader("WEBP", width, height, mode, 1, 1)
    if fourcc != b"VP8X":
        raise ProbeError(f"unsupported WebP chunk {fourcc!r}")
    if size < 10:
        raise ProbeError("corrupt WebP VP8X chunk")
    if head_end < 30:
        raise _truncated("WEBP", 30)
    flags = buf[20]
    width = int.from_bytes(buf[24:27], "little") + 1
    height = int.from_bytes(buf[27:30], "little") + 1
    mode = "RGBA" if flags & 0x10 else "RGB"
    animated = bool(flags & 0x02)
    if not (animated or flags & 0x08):
        # Neither animation nor EXIF announced: the rest of the file cannot change the result.
        return ImageHeader("WEBP", width, height, mode, 1, 1)

    # Walk the chunks after VP8X: count ANMF for animations, read EXIF (usually the last chunk).
    walk = _Walk("WEBP")
    frames = 0
    orientation = 1
    exif_seen = False
    complete = False
    pos = 20 + size + (size & 1)
    while True:
        walk.tick()
        if pos + 8 > riff_end:
            complete = True
            break
        if pos + 8 > n:
            break
        fourcc, size = struct.unpack_from("<4sI", buf, pos)
        if pos + 8 + size > riff_end:
            raise ProbeError("corrupt WebP chunk size (past the end of the RIFF container)")
        if fourcc == b"ANMF":
            frames += 1
        elif fourcc == b"EXIF" and not exif_seen:
            if pos + 8 + size > n:
                break
            orientation = _exif_orientation(buf[pos + 8 : pos + 8 + size])
            exif_seen = True
            if not animated:
                complete = True
                break
        pos += 8 + size + (size & 1)  # chunks are padded to even length
    if not complete:
        return ImageHeader("WEBP", width, height, mode, None, orientation)
    if animated and frames == 0:
        raise ProbeError("animated WebP has no frames")
    return ImageHeader("WEBP", width, height, mode, frames if animated else 1, orientation)
