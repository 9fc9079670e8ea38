"""Image header probe: format, size, mode, frame count and EXIF orientation, without decoding.

This package owns the first look at client-supplied image bytes. It runs on the sidecar's event
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

Layout. `header` holds what every parser shares (the result, the errors, the walk limits),
`sniff` the magic numbers, `exif` the orientation reader JPEG, PNG and WebP share, and one module
per format its parser: `jpeg`, `png`, `gif`, `webp`, `bmp`, `tiff`. Where a format's result
knowingly differs from what PIL reports after ``Image.open`` (TIFF, GIF, JPEG, PNG, WebP), its
module's docstring says so.
"""

from __future__ import annotations

import struct
from typing import Final

from .bmp import _probe_bmp
from .gif import _probe_gif
from .header import DEFAULT_MAX_HEADER_BYTES, WALK_LIMITS, ImageHeader, NeedMoreData, ProbeError, _header_limit
from .jpeg import _probe_jpeg
from .png import _probe_png
from .sniff import _reject_unknown, sniff_format
from .tiff import _probe_tiff
from .webp import _probe_webp

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "WALK_LIMITS",
    "ImageHeader",
    "NeedMoreData",
    "ProbeError",
    "probe",
    "sniff_format",
]

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
