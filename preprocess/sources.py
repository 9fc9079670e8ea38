"""Where an image's bytes come from: data URLs, bare base64 payloads and remote URLs.

Everything here works on the encoded form without decoding a whole payload on the event loop:
the size is computed from the base64 length, and only a growing prefix is decoded to read the
image header (`header_prefix`). A payload is a str, or a `SpanText` left in the request body's
buffer (long base64 runs are never parsed into a str on the event loop): both read the same here.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .probe import DEFAULT_MAX_HEADER_BYTES, ImageHeader, NeedMoreData, ProbeError, probe
from .spans import SpanText, Text


class SourceError(ValueError):
    """An image source that cannot be used; the message says why (the caller adds which part)."""


@dataclass(frozen=True, slots=True)
class InlineImage:
    """A base64 payload carried in the request (data URL or Anthropic base64 source)."""

    media_type: str | None
    b64: Text

    @property
    def nbytes(self) -> int:
        return b64_decoded_len(self.b64)


@dataclass(frozen=True, slots=True)
class RemoteImage:
    url: str
    host: str


Source = InlineImage | RemoteImage

_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_B64_TAIL = re.compile(r"[A-Za-z0-9+/]*={0,2}")


# Remote URLs are addresses, not payloads: anything longer is refused before it is parsed.
MAX_URL_CHARS = 65536


def b64_decoded_len(b64: Text) -> int:
    """Decoded size of a base64 string from its length alone (padding counted, no decode)."""
    n = len(b64)
    pad = 2 if b64.endswith("==") else 1 if b64.endswith("=") else 0
    return n // 4 * 3 - pad if n % 4 == 0 else n * 3 // 4


def parse_image_url(url: Text, media: str = "image") -> Source:
    """A chat `image_url.url` / Responses `image_url` (or `video_url` / `audio_url` with `media`):
    a data URL or an http(s) URL."""
    if url[:5].lower() == "data:":
        return parse_data_url(url, media)
    if len(url) > MAX_URL_CHARS or isinstance(url, SpanText):
        raise SourceError(f"URL is {len(url)} characters, more than {MAX_URL_CHARS}; send images inline as data URLs")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise SourceError("URL has no host")
        return RemoteImage(url=url, host=parts.hostname.lower())
    if not scheme:
        raise SourceError("expected a data: URL or an http(s):// URL")
    raise SourceError(f"URL scheme {scheme!r} is not allowed (use data: or http(s)://)")


def parse_data_url(url: Text, media: str = "image") -> InlineImage:
    match = _DATA_URL.match(url[:512])
    if match is None:
        raise SourceError("malformed data URL (expected data:<media type>;base64,<data>)")
    params = [p.strip().lower() for p in match.group(2).split(";") if p.strip()]
    if "base64" not in params:
        raise SourceError("data URL must be base64-encoded (data:<media type>;base64,...)")
    media_type = match.group(1).strip().lower() or None
    if media_type is not None and not media_type.startswith(f"{media}/"):
        article = "an" if media[0] in "aeiou" else "a"
        raise SourceError(f"data URL media type {media_type!r} is not {article} {media} type")
    return InlineImage(
        media_type=media_type, b64=url.tail(match.end()) if isinstance(url, SpanText) else url[match.end() :]
    )


def check_b64_shape(b64: Text) -> None:
    """Cheap structural check of a base64 payload: length and the padding at its end."""
    if not b64:
        raise SourceError("empty image data")
    if len(b64) % 4:
        # Only a prefix is decoded on the event loop: insist on the padded form so that a bad length
        # is caught here for every size, not only for payloads short enough to be decoded whole.
        raise SourceError("invalid base64 data (length is not a multiple of 4: padding missing?)")
    if _B64_TAIL.fullmatch(b64[-4:]) is None:
        raise SourceError("invalid base64 data (bad characters or padding at the end)")


# How fast the decoded prefix grows: every round probes it again from the start, so few rounds
# bound the probing (at most three from 4096 characters to a 1 MiB limit: 3 KiB, 48 KiB, the
# limit), while the first rounds stay small (48 KiB holds most EXIF thumbnails) so that ordinary
# images decode little.
_GROWTH = 16


class DeepHeader(Exception):
    """The header lies past `quick_bytes`: probe it again where a long decode stalls nothing."""


# Characters decoded per call: a2b_base64 keeps the GIL, so a thread probing a deep header hands
# the GIL back between pieces (`pause`) and an event loop waits for it ~0.15 ms at most.
_PIECE = 1 << 16


def header_prefix(
    b64: Text,
    *,
    start: int = 4096,
    max_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    quick_bytes: int | None = None,
    pause: Callable[[], None] | None = None,
) -> ImageHeader:
    """Probe an inline image's header by decoding growing prefixes of its base64 text.

    JPEG headers can sit behind large APP segments (EXIF thumbnails, ICC profiles), so the prefix
    grows (by `_GROWTH`, or straight to what the probe says it needs) until the probe has the whole
    header, but never past `max_bytes` decoded bytes (the sidecar's limits.max_header_bytes): an image
    whose header does not end there is refused, so the base64 decoded is bounded by the limit, not by
    the payload. Only the new part of each prefix is decoded.

    `quick_bytes`: raise DeepHeader rather than decode more than this (the event loop's share: a
    1 MiB prefix is ~5 ms of decoding); `pause` runs between decoded pieces (a thread's GIL hand-off).
    """
    # Base64 characters whose decoding reaches one byte past the limit: enough for the probe to
    # tell "the header does not end by the limit" from "the bytes given end first".
    cap = 4 * (max_bytes // 3 + 1)
    quick = None if quick_bytes is None else 4 * (quick_bytes // 3 + 1)
    size = max(4, min(start, cap))
    data = bytearray()
    done = 0  # characters of b64 decoded into data so far, a multiple of 4
    while True:
        end = len(b64) if size >= len(b64) else size - size % 4
        if quick is not None and end > quick:
            raise DeepHeader
        try:
            # a2b_base64 reads an ASCII str in place; strict mode holds because every cut is at a
            # multiple of 4 characters, so each piece decodes on its own.
            for lo in range(done, end, _PIECE):
                data += binascii.a2b_base64(b64[lo : min(lo + _PIECE, end)], strict_mode=True)
                if pause is not None:
                    pause()
        except ValueError as exc:  # binascii.Error, and a str that is not ASCII
            raise SourceError(f"invalid base64 data ({_b64_reason(exc)})") from None
        done = end
        try:
            # Frames are not priced: skip GIF's walk over every block, which could cost ~15 ms on
            # a prefix that grew to the limit.
            return probe(bytes(data), max_header_bytes=max_bytes, count_frames=False)
        except NeedMoreData as exc:
            if done == len(b64):
                if exc.header is not None:
                    # The whole payload, ending before its header does: nothing follows that
                    # could change the size, so price it by what was read; decoders refuse it.
                    return exc.header
                raise SourceError(f"truncated image: {exc}") from None
            needed = 4 * ((exc.need or 0) + 2) // 3 + 4
            size = max(size * _GROWTH, needed)
            if size * 2 > cap:
                size = cap  # a round for less than half the way would be one probe more for little
            if quick is not None and min(size, len(b64)) > quick >= needed:
                size = quick  # what the probe asked for fits the quick share: one more round here
        except ProbeError as exc:
            raise SourceError(str(exc)) from None


def _b64_reason(exc: Exception) -> str:
    if not isinstance(exc, binascii.Error):  # a2b_base64's refusal of a str that is not ASCII
        return "non-ASCII characters"
    text = str(exc)
    return text[0].lower() + text[1:] if text else "undecodable"
