"""GIF header: the logical screen, then the blocks up to frame 0's image descriptor; the frame count after it.

The header ends at frame 0's image descriptor, which may grow the canvas (PIL decodes frame 0
only, as everything downstream does).

Where the result knowingly differs from what PIL reports after ``Image.open``: ``mode`` is always
"P" (PIL says "L" when the palette is missing or an identity gray ramp). The size is frame 0's
canvas, as PIL's; PIL grows it further only when later frames that overflow it are visited, which
a decode of frame 0 never does.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from .header import _GIF_HEADER_STEPS, WALK_LIMITS, ImageHeader, ProbeError, _truncated, _zero_dimension

_GIF_BLOCK_COST: Final = 8
_GIF_STRAY: Final = re.compile(rb"[^\x21\x2c\x3b]+")


def _probe_gif(buf: bytes, limit: int, count_frames: bool) -> ImageHeader:
    n = len(buf)
    # The header runs to frame 0's image descriptor and must end by `limit`; the frame count after
    # it is walked over everything given.
    head_end = min(n, limit)
    if head_end < 13:
        raise _truncated("GIF", 13)
    width, height, flags = struct.unpack_from("<HHB", buf, 6)
    if width == 0 or height == 0:
        raise _zero_dimension("GIF", width, height)
    screen = ImageHeader("GIF", width, height, "P", None, 1)
    pos = 13
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)  # global color table
    # Steps are counted inline (no _Walk) because this is the one walk that covers the whole
    # file. A block costs more than a sub-block: it does several times the Python work.
    limit_steps = WALK_LIMITS["GIF"]
    steps = 0
    frames = 0
    complete = False
    while True:
        steps += _GIF_BLOCK_COST
        if steps > (limit_steps if frames else _GIF_HEADER_STEPS):
            raise ProbeError("GIF has too many blocks to probe")
        end = n if frames else head_end
        if pos >= end:
            if not frames:
                raise _truncated("GIF", pos + 1, screen)
            break
        block = buf[pos]
        if block == 0x3B:  # trailer
            complete = True
            break
        if block == 0x2C:  # image descriptor
            if pos + 10 > end:
                if not frames:
                    raise _truncated("GIF", pos + 10, screen)
                break
            x, y, w, h, fl = struct.unpack_from("<HHHHB", buf, pos + 1)
            if not frames:
                # PIL's open grows the canvas to fit frame 0 where it overflows the logical screen
                # (and grows it again only when later frames are visited, which decoding frame 0
                # never does): report the canvas that frame 0 is decoded into.
                width = max(width, x + w)
                height = max(height, y + h)
            frames += 1
            if not count_frames:
                return ImageHeader("GIF", width, height, "P", None, 1)
            end = n
            pos += 10
            if fl & 0x80:
                pos += 3 << ((fl & 7) + 1)  # local color table
            pos += 1  # LZW minimum code size
        elif block == 0x21:  # extension: introducer, label, then sub-blocks
            pos += 2
        else:
            # PIL ignores stray bytes between blocks; do the same so frame counts agree, skipping
            # the whole run at C speed.
            stray = _GIF_STRAY.match(buf, pos, end)
            assert stray is not None
            pos = stray.end()
            continue
        # Data sub-blocks: a length byte then that many bytes, ended by a zero length.
        while pos < end:
            size = buf[pos]
            pos += size + 1
            if size == 0:
                break
            steps += 1
            if steps > (limit_steps if frames else _GIF_HEADER_STEPS):
                raise ProbeError("GIF has too many blocks to probe")
        else:
            if not frames:
                raise _truncated("GIF", pos + 1, screen)
            break
    if complete and frames == 0:
        raise ProbeError("GIF has no frames")
    return ImageHeader("GIF", width, height, "P", frames if complete else None, 1)
