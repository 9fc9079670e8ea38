"""Find every media part of a request, check it against `limits.*`, and price it for the gate.

Walks the four request shapes the sidecar serves: OpenAI chat (`image_url` object or bare string,
`video_url`, `audio_url`, `input_audio`), OpenAI Responses (`input_image` with `image_url` or
`file_id`, also inside `function_call_output`), Anthropic messages (`image` blocks with `base64`,
`url` or `file` sources, also nested in `tool_result`), and legacy completions (always text).
A request with any media part is multimodal. Every error names the part (`messages[2].content[1]`).

The price of an inline image is its decoded RGB size read from the header (the probe decodes
only a short base64 prefix), so the walk costs microseconds, not a decode, on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from preprocess.arena import reservation_size
from preprocess.cost import CostError, output_nbytes
from preprocess.probe import ImageHeader
from preprocess.processors import ProcessorSpec
from preprocess.sources import (
    InlineImage,
    RemoteImage,
    Source,
    SourceError,
    check_b64_shape,
    header_prefix,
    parse_image_url,
)

from .config import GateConfig, LimitsConfig
from .errors import Cause, SidecarError

ApiKind = Literal["chat", "completions", "responses", "messages"]
MediaKind = Literal["image", "video", "audio"]


@dataclass(slots=True)
class MediaPart:
    path: str  # where it sits in the body, e.g. "messages[2].content[1]"
    media: MediaKind
    source: Source | None  # None: referenced by file id, or audio carried as raw base64
    encoded_bytes: int  # bytes the client sent inline (0 for URLs and file ids)
    node: dict[str, Any] = field(default_factory=dict, repr=False)  # the part object itself, to rewrite
    header: ImageHeader | None = None
    cost: int = 0  # bytes reserved at the gate


@dataclass(frozen=True, slots=True)
class Classification:
    parts: tuple[MediaPart, ...]

    @property
    def multimodal(self) -> bool:
        return bool(self.parts)

    @property
    def kind(self) -> Literal["text", "multimodal"]:
        return "multimodal" if self.parts else "text"

    @property
    def cost(self) -> int:
        return sum(p.cost for p in self.parts)

    @property
    def encoded_bytes(self) -> int:
        return sum(p.encoded_bytes for p in self.parts)


def _bad(path: str, message: str) -> SidecarError:
    return SidecarError(Cause.BAD_REQUEST, f"{path}: {message}", param=path)


def _type_of(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, int | float) else type(value).__name__
    )


def _url_field(path: str, value: object, key: str) -> str:
    """`image_url` / `video_url` / `audio_url`: a bare string or an object with a string `url`."""
    if isinstance(value, str):
        url = value
    elif isinstance(value, dict):
        inner = value.get("url")
        if not isinstance(inner, str):
            raise _bad(f"{path}.{key}.url", f"must be a string, got {_type_of(inner)}")
        url = inner
    else:
        raise _bad(f"{path}.{key}", f"must be a string or an object with 'url', got {_type_of(value)}")
    if not url:
        raise _bad(f"{path}.{key}", "empty URL")
    return url


def _source(path: str, url: str, media: MediaKind) -> Source:
    try:
        return parse_image_url(url, media)
    except SourceError as exc:
        raise SidecarError(Cause.BAD_IMAGE, f"{path}: {exc}", param=path) from None


def _url_part(path: str, media: MediaKind, url: str) -> MediaPart:
    source = _source(path, url, media)
    encoded = source.nbytes if isinstance(source, InlineImage) else 0
    return MediaPart(path, media, source, encoded)


def _openai_part(path: str, part: dict[str, Any]) -> MediaPart | None:
    ptype = part.get("type")
    if ptype == "image_url":
        return _url_part(path, "image", _url_field(path, part.get("image_url"), "image_url"))
    if ptype == "input_image":
        url, file_id = part.get("image_url"), part.get("file_id")
        if isinstance(url, dict):  # tolerated: some clients send the chat shape here
            url = url.get("url")
        if isinstance(url, str) and url:
            return _url_part(path, "image", url)
        if isinstance(file_id, str) and file_id:
            return MediaPart(path, "image", None, 0)
        raise _bad(path, "input_image needs a non-empty string 'image_url' or 'file_id'")
    if ptype == "video_url":
        return _url_part(path, "video", _url_field(path, part.get("video_url"), "video_url"))
    if ptype == "audio_url":
        return _url_part(path, "audio", _url_field(path, part.get("audio_url"), "audio_url"))
    if ptype == "input_audio":
        audio = part.get("input_audio")
        data = audio.get("data") if isinstance(audio, dict) else None
        if not isinstance(data, str) or not data:
            raise _bad(f"{path}.input_audio", "must be an object with a non-empty base64 string 'data'")
        return MediaPart(path, "audio", None, InlineImage(None, data).nbytes)
    return None


def _anthropic_block(path: str, block: dict[str, Any]) -> Iterator[MediaPart]:
    btype = block.get("type")
    if btype == "image":
        source = block.get("source")
        if not isinstance(source, dict):
            raise _bad(f"{path}.source", f"must be an object, got {_type_of(source)}")
        stype = source.get("type")
        if stype == "base64":
            data, media_type = source.get("data"), source.get("media_type")
            if not isinstance(data, str) or not data:
                raise _bad(f"{path}.source.data", "must be a non-empty base64 string")
            if not isinstance(media_type, str) or not media_type.startswith("image/"):
                raise _bad(f"{path}.source.media_type", f"must be an image media type, got {media_type!r}")
            inline = InlineImage(media_type, data)
            yield MediaPart(path, "image", inline, inline.nbytes)
        elif stype == "url":
            url = source.get("url")
            if not isinstance(url, str) or not url:
                raise _bad(f"{path}.source.url", "must be a non-empty string")
            yield _url_part(path, "image", url)
        elif stype == "file":
            if not isinstance(source.get("file_id"), str):
                raise _bad(f"{path}.source.file_id", "must be a string")
            yield MediaPart(path, "image", None, 0)
        else:
            raise _bad(f"{path}.source.type", f"must be 'base64', 'url' or 'file', got {stype!r}")
    elif btype == "tool_result":
        yield from _walk_parts(f"{path}.content", block.get("content"), _anthropic_block)


def _walk_parts(path: str, content: object, visit: Any) -> Iterator[MediaPart]:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(path, f"must be a string or an array of content parts, got {_type_of(content)}")
    for j, part in enumerate(content):
        where = f"{path}[{j}]"
        if not isinstance(part, dict):
            raise _bad(where, f"content part must be an object, got {_type_of(part)}")
        if not isinstance(part.get("type"), str):
            raise _bad(f"{where}.type", f"must be a string, got {_type_of(part.get('type'))}")
        found = visit(where, part)
        if isinstance(found, MediaPart):
            found.node = part
            yield found
        elif found is not None:
            for media in found:
                if media.path == where:
                    media.node = part
                yield media


def _messages(body: dict[str, Any], visit: Any) -> Iterator[MediaPart]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("messages", f"must be an array, got {_type_of(messages)}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", f"must be an object, got {_type_of(message)}")
        yield from _walk_parts(f"messages[{i}].content", message.get("content"), visit)


def _responses_input(body: dict[str, Any]) -> Iterator[MediaPart]:
    items = body.get("input")
    if items is None or isinstance(items, str):
        return
    if not isinstance(items, list):
        raise _bad("input", f"must be a string or an array, got {_type_of(items)}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(f"input[{i}]", f"must be an object, got {_type_of(item)}")
        if "content" in item:
            yield from _walk_parts(f"input[{i}].content", item["content"], _openai_part)
        if item.get("type") == "function_call_output" and isinstance(item.get("output"), list):
            yield from _walk_parts(f"input[{i}].output", item["output"], _openai_part)


def find_media(kind: ApiKind, body: dict[str, Any]) -> list[MediaPart]:
    """Every media part, in body order; raises SidecarError(BAD_REQUEST) on a malformed shape."""
    if kind == "chat":
        return list(_messages(body, _openai_part))
    if kind == "messages":
        return list(_messages(body, _anthropic_block))
    if kind == "responses":
        return list(_responses_input(body))
    return []  # completions: a prompt is text or token ids


def classify(
    kind: ApiKind,
    body: dict[str, Any],
    limits: LimitsConfig,
    gate: GateConfig,
    spec: ProcessorSpec | None = None,
) -> Classification:
    """Find, check and price every media part; raises SidecarError naming the first offending part.

    Remote images are checked against the URL policy here and priced later, once fetched
    (`price_image`); until then they carry no cost.
    """
    parts = find_media(kind, body)
    if len(parts) > limits.max_images_per_request:
        first_over = parts[limits.max_images_per_request]
        raise SidecarError(
            Cause.TOO_MANY_IMAGES,
            f"{first_over.path}: request has {len(parts)} media parts, more than "
            f"limits.max_images_per_request={limits.max_images_per_request}",
            param=first_over.path,
        )
    for part in parts:
        _check_and_price(part, limits, gate, spec)
    return Classification(tuple(parts))


def _refuse(cause: Cause, part: MediaPart, message: str) -> SidecarError:
    return SidecarError(cause, f"{part.path}: {message}", param=part.path)


def _check_and_price(part: MediaPart, limits: LimitsConfig, gate: GateConfig, spec: ProcessorSpec | None) -> None:
    if part.encoded_bytes > limits.max_image_bytes:
        raise _refuse(
            Cause.IMAGE_TOO_LARGE,
            part,
            f"{part.media} is {part.encoded_bytes} bytes, more than limits.max_image_bytes={limits.max_image_bytes}",
        )
    source = part.source
    if isinstance(source, RemoteImage):
        if not limits.allow_remote_urls:
            raise _refuse(
                Cause.REMOTE_URL_FORBIDDEN,
                part,
                f"remote {part.media} URLs are disabled (limits.allow_remote_urls=false); "
                "send the data inline as a base64 data URL",
            )
        if part.media != "image":
            # Only images are fetched (and inlined) by the sidecar; any other URL would make the
            # engine fetch an address nobody checked.
            raise _refuse(
                Cause.REMOTE_URL_FORBIDDEN, part, f"remote {part.media} URLs are not supported; send the data inline"
            )
        if limits.allowed_hosts and not host_allowed(source.host, limits.allowed_hosts):
            raise _refuse(Cause.REMOTE_URL_FORBIDDEN, part, f"host {source.host!r} is not in limits.allowed_hosts")
        return  # priced once fetched
    if isinstance(source, InlineImage) and part.media == "image":
        try:
            check_b64_shape(source.b64)
            header = header_prefix(source.b64)
        except SourceError as exc:
            raise _refuse(Cause.BAD_IMAGE, part, str(exc)) from None
        price_image(part, header, limits, spec)
    else:
        part.cost = gate.unknown_image_bytes


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Exact match, or a leading-dot entry (`.example.com`) for any subdomain: the fetcher's rule."""
    return any(host == entry or (entry.startswith(".") and host.endswith(entry)) for entry in allowed)


def price_image(part: MediaPart, header: ImageHeader, limits: LimitsConfig, spec: ProcessorSpec | None) -> None:
    """Check an image's header against the limits and set its exact cost (before any decode)."""
    width, height = header.display_size
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise _refuse(
            Cause.IMAGE_TOO_LARGE,
            part,
            f"image is {width}x{height} = {pixels} pixels, more than limits.max_image_pixels={limits.max_image_pixels}",
        )
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise _refuse(
            Cause.BAD_IMAGE,
            part,
            f"image is {width}x{height}, an aspect ratio above limits.max_aspect_ratio={limits.max_aspect_ratio:g}",
        )
    part.header = header
    if spec is None:
        # Decoded RGB bytes: what the engine's decode step holds per image before its processor runs.
        part.cost = pixels * 3
        return
    try:
        # Exactly the processor's outputs (pixel_values, image_grid_thw, ...), page-rounded as the
        # arena reserves them.
        part.cost = reservation_size(output_nbytes(spec, width, height))
    except CostError as exc:
        raise _refuse(Cause.BAD_IMAGE, part, f"the image processor would refuse this image: {exc}") from None
