"""Remote image URLs in passthrough mode: fetched by the sidecar, checked, priced and inlined.

With `limits.allow_remote_urls` on, the sidecar fetches each image URL itself through the
SSRF-safe fetcher (`preprocess.fetch`: the address check applies to the address actually
connected to, on every redirect hop), probes the header, prices it like an inline image, and
rewrites the part into a base64 data URL (Anthropic: a base64 source) before forwarding. The
engine then never fetches anything, so it cannot be made to connect to an address the sidecar
did not check, and the gate knows the exact cost before admission.
"""

from __future__ import annotations

import asyncio
import binascii
import time

from preprocess.fetch import FetchError, SafeFetcher
from preprocess.probe import ProbeError, probe
from preprocess.processors import ProcessorSpec
from preprocess.sources import InlineImage, RemoteImage
from preprocess.spans import SpanText

from .bodies import BodyCharge
from .classify import MediaPart, price_image
from .config import LimitsConfig
from .errors import Cause, SidecarError
from .hollow import Texts
from .metrics import Metrics

MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp"}
MIME["TIFF"] = "image/tiff"


class RemoteImages:
    """The fetcher and the bound on fetches in flight, shared by all requests of one app."""

    def __init__(self, fetcher: SafeFetcher, max_concurrent: int, metrics: Metrics) -> None:
        self.fetcher = fetcher
        self.slots = asyncio.Semaphore(max_concurrent)
        self.metrics = metrics

    async def inline(
        self,
        parts: tuple[MediaPart, ...],
        limits: LimitsConfig,
        spec: ProcessorSpec | None,
        charge: BodyCharge,
        texts: Texts,
    ) -> None:
        """Fetch, check, price and inline every remote image; their base64 text is added to `charge`
        and to `texts` (it goes upstream as the encoded bytes, never as a str in the tree)."""
        remote = [p for p in parts if isinstance(p.source, RemoteImage)]
        if not remote:
            return
        results = await asyncio.gather(
            *(self._one(p, limits, spec, charge, texts) for p in remote), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _one(
        self, part: MediaPart, limits: LimitsConfig, spec: ProcessorSpec | None, charge: BodyCharge, texts: Texts
    ) -> None:
        assert isinstance(part.source, RemoteImage)  # the caller filtered
        started = time.monotonic()
        async with self.slots:
            try:
                data = await self.fetcher.fetch(part.source.url)
            except FetchError as exc:
                cause = Cause.FETCH_UNAVAILABLE if exc.retryable else Cause.FETCH_FAILED
                raise SidecarError(cause, f"{part.path}: cannot fetch the image: {exc}", param=part.path) from None
            finally:
                self.metrics.fetch_seconds.observe(time.monotonic() - started)
        try:
            header = probe(data, max_header_bytes=limits.max_header_bytes)
        except ProbeError as exc:
            raise SidecarError(Cause.BAD_IMAGE, f"{part.path}: fetched image: {exc}", param=part.path) from None
        if header.frames is None:
            raise SidecarError(Cause.BAD_IMAGE, f"{part.path}: fetched image is truncated", param=part.path)
        price_image(part, header, limits, spec)
        part.encoded_bytes = len(data)
        pieces = await _encode(data)
        charge.take(sum(len(p) for p in pieces))
        mime = MIME[header.format]
        part.source = InlineImage(mime, SpanText(tuple(memoryview(p) for p in pieces)))
        _rewrite(part, mime, texts.add(pieces))


# Base64 in slices of this many input bytes (a multiple of 3, so the slices' encodings concatenate):
# binascii keeps the GIL, so a 20 MiB image encoded at once held the loop ~25 ms, in a thread or not.
_ENCODE_SLICE = 3 << 18


async def _encode(data: bytes) -> tuple[bytes, ...]:
    view = memoryview(data)
    pieces: list[bytes] = []
    for start in range(0, len(data), _ENCODE_SLICE):
        pieces.append(binascii.b2a_base64(view[start : start + _ENCODE_SLICE], newline=False))
        await asyncio.sleep(0)  # ~1 ms a slice: let the loop run between them
    return tuple(pieces)


def _rewrite(part: MediaPart, mime: str, b64: str) -> None:
    node = part.node
    if node.get("type") == "image":  # Anthropic
        node["source"] = {"type": "base64", "media_type": mime, "data": b64}
    elif node.get("type") == "input_image":  # Responses
        node["image_url"] = f"data:{mime};base64,{b64}"
    else:  # chat image_url, object or bare string
        old = node.get("image_url")
        extra = {k: v for k, v in old.items() if k != "url"} if isinstance(old, dict) else {}
        node["image_url"] = {"url": f"data:{mime};base64,{b64}", **extra}
