"""Telling the format from the magic number, and the reason given when no magic matches."""

from __future__ import annotations

from typing import Final

from .header import NeedMoreData, ProbeError

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
