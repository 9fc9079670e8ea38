"""Image header probe: format, size, mode, frame count and EXIF orientation, without decoding.

This module owns the first look at client-supplied image bytes. It runs on the sidecar's event
loop, before any decoder sees the payload, on bytes an attacker controls, so it imports only the
standard library and follows three rules everywhere:

* never allocate in proportion to a size the file claims (only slices of the input are taken,
  and every parsed table is bounded by what is actually present);
* every walk advances by at least one byte per step and is capped at ``WALK_LIMITS[format]``
  steps, so a forged length field can neither loop nor stall the event loop;
* anything malformed surfaces as ``ProbeError`` with a short human reason; nothing else escapes.

Size limits are not enforced here: dimensions are reported as stored (even above 2**24) and the
caller decides. One bound is: the header must lie in the first ``max_header_bytes`` of the input
(``DEFAULT_MAX_HEADER_BYTES``, 1 MiB, unless the caller passes its ``limits.max_header_bytes``).
A JPEG can put any number of APP segments before its frame header, a PNG any number of chunks
before IDAT, a GIF any number of extensions before its first image; without the bound, finding
the header of a 20 MiB inline image would mean decoding all of its base64 on the event loop.

The header ends where nothing later in the file can change the size PIL decodes: the first scan
(SOS) for JPEG, whose frame headers all precede it and PIL keeps the last; the first IDAT for PNG,
before which PIL honours every IHDR; frame 0's image descriptor for GIF, which may grow the canvas
(PIL decodes frame 0 only, as everything downstream does); the first chunk for WebP, the first IFD
for TIFF, the info header and palette for BMP. A second JPEG frame header or PNG IHDR before that
point is refused: the probe would price one size and PIL decode another.

Partial input. The caller may probe growing prefixes of a payload. ``NeedMoreData`` (a
``ProbeError``) means the bytes end before the header does; its ``need`` is a lower bound on the
total length to supply next (exact when the header has a fixed size), and its ``header`` is what
the bytes say if they are the whole file (format, size and mode read so far, ``frames`` None), or
None before the size was read. Once the header is complete a result is returned even if the rest
of the metadata walk was cut short; ``frames is None`` marks such a partial result: the frame
count is unknown and ``orientation`` reflects only the bytes seen (WebP, for instance, stores EXIF
after the image data). Called with the whole payload, ``frames is None`` means the file itself is
truncated (or that ``count_frames=False`` skipped the count).

Where the result knowingly differs from what PIL reports after ``Image.open``:

* TIFF: PIL's ``size`` already has the orientation tag applied; it equals ``display_size`` here.
* GIF: ``mode`` is always "P" (PIL says "L" when the palette is missing or an identity gray
  ramp). The size is frame 0's canvas, as PIL's; PIL grows it further only when later frames
  that overflow it are visited, which a decode of frame 0 never does.
* JPEG: multi-picture files (PIL format "MPO") are reported as "JPEG" with one frame.
* PNG: an eXIf chunk after the first IDAT is not read (PIL finds it on load).
* WebP: ``mode`` follows the VP8X alpha flag; PIL follows the bitstream. (A VP8X canvas that
  differs from its bitstream's size is refused by libwebp at open, so sizes cannot disagree.)
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "WALK_LIMITS",
    "ImageHeader",
    "NeedMoreData",
    "ProbeError",
    "probe",
    "sniff_format",
]

# Upper bound on the segments, chunks, blocks, IFDs or IFD entries one probe may visit, per format.
# Each is far above what legitimate files hold (a JPEG has tens of segments before its scan, a PNG
# tens of chunks before IDAT, a TIFF tens of entries in an IFD; GIF encoders write 255-byte
# sub-blocks, so 2**17 steps is ~32 MiB of LZW data), while a hostile file of minimal blocks is cut
# off after at most ~15 ms of pure-Python looping on the event loop. The walks that are all header
# (JPEG, PNG) and the part of GIF's before its first image (``_GIF_HEADER_STEPS``) get about a
# millisecond: `sources.header_prefix` may probe a growing prefix a few times. Exceeding a limit is
# a ProbeError, not a partial result: more bytes would not help.
WALK_LIMITS: Final[Mapping[str, int]] = MappingProxyType(
    {"JPEG": 1 << 10, "PNG": 1 << 10, "GIF": 1 << 17, "WEBP": 1 << 14, "TIFF": 1 << 12}
)
_GIF_HEADER_STEPS: Final = 1 << 13  # an XMP packet, stored as sub-blocks of ~80 bytes, fits 640 KiB

# Where the header must end unless the caller says otherwise (the sidecar passes its
# limits.max_header_bytes). Camera and phone files keep what precedes the frame header far below it:
# EXIF is one APP1 segment (< 64 KiB by the format), embedded ICC profiles a few KiB (sRGB
# IEC61966-2.1: 3 KiB; Display P3: about 0.5 KiB), an XMP packet a few KiB, MPF's index a few hundred
# bytes (the pictures it indexes, gain maps and depth maps, follow the first EOI, which the probe never
# reaches). The known exception: Google's depth-map XMP (GDepth/GImage, Lens Blur era) carries
# base64 images in extended-XMP APP1 segments before the frame header and can pass 1 MiB; such
# files are refused unless the operator raises the limit.
DEFAULT_MAX_HEADER_BYTES: Final = 1 << 20


class ProbeError(ValueError):
    """The bytes are not an image this service accepts; the message is a short human reason."""


class NeedMoreData(ProbeError):
    """The bytes end before the header could be read; retry with at least ``need`` bytes.

    ``need`` is a lower bound on the total length (``None`` when not even that is known); a retry
    with fewer bytes cannot succeed, one with more may still ask for more.
    """

    def __init__(self, message: str, need: int | None = None, header: ImageHeader | None = None) -> None:
        super().__init__(message)
        self.need = need
        # What the bytes say if they are the whole file (frames None): see the module docstring.
        self.header = header

    def __reduce__(self) -> tuple[type[NeedMoreData], tuple[str, int | None, ImageHeader | None]]:
        # Keep the exception picklable/copyable despite the extra constructor arguments.
        return (type(self), (str(self), self.need, self.header))


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the header says, before decoding. Mode names follow PIL."""

    format: str
    width: int
    height: int
    mode: str
    frames: int | None
    orientation: int

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) after applying the EXIF orientation: orientations 5..8 transpose."""
        if self.orientation >= 5:
            return (self.height, self.width)
        return (self.width, self.height)


class _Walk:
    """Step counter shared by one probe's loops; raises once the budget is spent."""

    __slots__ = ("limit", "steps", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.limit = WALK_LIMITS[what]
        self.steps = 0

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limit:
            raise ProbeError(f"{self.what} has too many blocks to probe")


def _zero_dimension(fmt: str, width: int, height: int) -> ProbeError:
    return ProbeError(f"{fmt} header has a zero dimension ({width}x{height})")


def _truncated(fmt: str, need: int | None, header: ImageHeader | None = None) -> NeedMoreData:
    return NeedMoreData(f"truncated {fmt} header", need, header)


def _header_limit(limit: int) -> ProbeError:
    return ProbeError(f"no image header in the first {limit} bytes (limits.max_header_bytes)")


# --------------------------------------------------------------------------- sniffing

_PNG_SIG: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_SIG: Final = b"\xff\xd8\xff"
_TIFF_SIGS: Final = (b"II*\x00", b"MM\x00*")
# Every magic we recognise, with the total length needed to tell whether it matches (RIFF needs
# the "WEBP" form type at offset 8). Used to tell "too short to say" from "not an image".
_MAGICS: Final = (
    (_JPEG_SIG, 3),
    (_PNG_SIG, 8),
    (b"GIF87a", 6),
    (b"GIF89a", 6),
    (b"RIFF", 12),
    (b"II*\x00", 4),
    (b"MM\x00*", 4),
    (b"BM", 2),
)


def sniff_format(data: bytes | memoryview) -> str | None:
    """PIL format name from the magic number alone, or None. Looks at the first 12 bytes only."""
    head = bytes(data[:12])
    if head.startswith(_JPEG_SIG):
        return "JPEG"
    if head.startswith(_PNG_SIG):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in _TIFF_SIGS:
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    return None


def _reject_unknown(buf: bytes) -> ProbeError:
    """The error for bytes no magic matched: NeedMoreData if a magic could still match."""
    n = len(buf)
    for magic, need in _MAGICS:
        if n < need and buf[: len(magic)] == magic[:n]:
            return NeedMoreData("truncated image signature", need)
    # Only a bounded prefix is inspected: the text checks must not scale with the payload.
    text = buf[:4096]
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:]
    text = text.lstrip().lower()
    is_html = text.startswith((b"<!doctype html", b"<html"))
    if not is_html and (
        text.startswith((b"<?xml", b"<svg", b"<!doctype svg")) or (text.startswith(b"<") and b"<svg" in text)
    ):
        return ProbeError("SVG images are not supported")
    return ProbeError(f"unsupported image format (starts with {buf[:8]!r})")


# --------------------------------------------------------------------------- EXIF / TIFF IFDs

# TIFF field type -> byte size of one value, for the integer types a header field may use.
_TIFF_TYPE_SIZES: Final = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4}


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


# --------------------------------------------------------------------------- JPEG

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


# --------------------------------------------------------------------------- PNG

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


# --------------------------------------------------------------------------- GIF


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


# --------------------------------------------------------------------------- WebP


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


# --------------------------------------------------------------------------- BMP

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


# --------------------------------------------------------------------------- entry point

_PROBES: Final = {
    "JPEG": _probe_jpeg,
    "PNG": _probe_png,
    "GIF": _probe_gif,
    "WEBP": _probe_webp,
    "BMP": _probe_bmp,
    "TIFF": _probe_tiff,
}


def probe(
    data: bytes | memoryview, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, count_frames: bool = True
) -> ImageHeader:
    """Read format, size, mode, frames and orientation from the header bytes, without decoding.

    The header must end within the first ``max_header_bytes`` bytes: when ``data`` is longer and
    the header is not complete by then, the image is refused (``ProbeError``) rather than searched
    further. ``count_frames=False`` skips the walks after the header that only count frames (GIF's
    blocks, TIFF's IFD chain: ``frames`` is None for those), for a caller that prices the image by
    its header alone and may probe a growing prefix several times.

    Raises ``NeedMoreData`` if ``data`` ends before the header does (see the module docstring for
    what a partial result means) and ``ProbeError`` for anything that is not a supported image.
    """
    if max_header_bytes < 1:
        raise ValueError(f"max_header_bytes must be positive, got {max_header_bytes}")
    # One contiguous copy for memoryviews (and bytearray) so the parsers can use bytes.find and
    # struct on it; this is proportional to what was received, never to what the file claims.
    buf = data if isinstance(data, bytes) else bytes(data)
    if not buf:
        raise ProbeError("empty image data")
    fmt = sniff_format(buf)
    if fmt is None:
        raise _reject_unknown(buf)
    try:
        return _PROBES[fmt](buf, max_header_bytes, count_frames)
    except NeedMoreData:
        if len(buf) > max_header_bytes:
            # The parsers stop looking for the header at the limit, so running out of bytes
            # there means it does not end in time; more data cannot help.
            raise _header_limit(max_header_bytes) from None
        raise
    except (struct.error, IndexError) as exc:  # pragma: no cover - every read is bounds-checked
        # A missed bounds check must still surface as a rejection, not a 500.
        raise ProbeError(f"corrupt {fmt} header") from exc
