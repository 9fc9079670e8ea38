"""What every format's parser shares: the result type, the errors, and the bounds on a walk.

A parser returns an ``ImageHeader`` or raises ``ProbeError`` (``NeedMoreData`` when the bytes end
before the header does); ``_Walk`` caps its loops at ``WALK_LIMITS[format]`` steps, and the header
must end within ``DEFAULT_MAX_HEADER_BYTES`` unless the caller passes another limit (see the
`preprocess.probe` docstring for both rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

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
        # What the bytes say if they are the whole file (frames None): see the `preprocess.probe` docstring.
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
