"""JPEG header: the segments from SOI up to the first scan (SOS).

The header ends at the first scan: the frame headers all precede it and PIL keeps the last. A
second frame header before that point is refused: the probe would price one size and PIL decode
another.

Where the result knowingly differs from what PIL reports after ``Image.open``: multi-picture files
(PIL format "MPO") are reported as "JPEG" with one frame.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from .exif import _exif_orientation
from .header import ImageHeader, NeedMoreData, ProbeError, _truncated, _Walk, _zero_dimension

_FF_RUN: Final = re.compile(rb"\xff+")
# SOF0..SOF15 minus DHT (C4), JPG (C8) and DAC (CC), which share the range but are tables.
_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..RST7 and SOI.
_STANDALONE_MARKERS: Final = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_MODES: Final = {1: "L", 3: "RGB", 4: "CMYK"}


def _probe_jpeg(buf: bytes, limit: int, count_frames: bool) -> ImageHeader:
    # Everything up to the first scan is header (see the module docstring): search it in the
    # first `limit` bytes only.
    buf = buf[:limit]
    n = len(buf)
    walk = _Walk("JPEG")
    orientation = 1
    exif_seen = False
    frame: tuple[int, int, str] | None = None  # (width, height, mode) of the frame header

    def truncated(need: int | None) -> NeedMoreData:
        known = None if frame is None else ImageHeader("JPEG", *frame, None, orientation)
        return _truncated("JPEG", need, known)

    pos = 2
    while True:
        walk.tick()
        # Bytes that are not 0xFF between segments are junk that PIL skips too; find() and the
        # anchored regex run at C speed, so long junk or fill runs cost no Python steps.
        ff = buf.find(b"\xff", pos)
        if ff < 0:
            raise truncated(None)
        run = _FF_RUN.match(buf, ff)
        assert run is not None
        pos = run.end()
        if pos >= n:
            raise truncated(pos + 3)
        marker = buf[pos]
        pos += 1
        if marker == 0x00 or marker in _STANDALONE_MARKERS:
            # 0xFF00 is a stuffed byte, meaningless before a scan: treat as junk like PIL does.
            continue
        if marker == 0xD9:
            if frame is None:
                raise ProbeError("JPEG ends before its frame header")
            # PIL reads on past an EOI up to the scan, and so takes any frame header behind it.
            continue
        if marker == 0xDA:
            if frame is None:
                raise ProbeError("JPEG scan starts before its frame header")
            return ImageHeader("JPEG", *frame, 1, orientation)
        if pos + 2 > n:
            raise truncated(pos + 2)
        (length,) = struct.unpack_from(">H", buf, pos)
        if length < 2:
            raise ProbeError("corrupt JPEG segment length")
        seg_end = pos + length
        if marker in _SOF_MARKERS:
            if frame is not None:
                # PIL's open keeps the last frame header's size and mode and libjpeg refuses the
                # second; pricing the first would admit an image at a size nothing decodes.
                raise ProbeError("JPEG has more than one frame header before its scan")
            if length < 8:
                raise ProbeError("corrupt JPEG frame header")
            if pos + 8 > n:
                raise truncated(pos + 8)
            height, width, components = struct.unpack_from(">HHB", buf, pos + 3)
            if width == 0:
                raise _zero_dimension("JPEG", width, height)
            if height == 0:
                # Height 0 defers it to a DNL marker after the first scan; PIL cannot do that.
                raise ProbeError("JPEG with height defined by a DNL marker is not supported")
            mode = _JPEG_MODES.get(components)
            if mode is None:
                raise ProbeError(f"unsupported JPEG component count ({components})")
            frame = (width, height, mode)
        elif marker == 0xE1 and not exif_seen and length >= 8:
            # APP1 also carries XMP; only the first "Exif" one counts, as in PIL.
            if pos + 7 > n:
                raise truncated(pos + 7)
            if buf[pos + 2 : pos + 7] == b"Exif\x00":
                if seg_end > n:
                    raise truncated(seg_end + 4)
                exif_seen = True
                orientation = _exif_orientation(buf[pos + 2 : seg_end])
        # Skipping needs no bytes of the segment, but the next marker lies beyond it.
        pos = seg_end
        if pos + 4 > n:
            raise truncated(pos + 4)
