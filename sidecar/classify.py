"""The one walker over request content: find, count, check and price every content part of every route.

This is the only module of the sidecar that knows where content parts sit in a request and what
their types mean. Everything downstream works from its result (`Classification`): the gate prices
the media parts, the remote fetcher inlines them, the offload rewrite replaces them with tensor
parts, and the translators ask it for each non-text part's chat form (`Classification.chat_part`),
so what is forwarded is exactly what was checked here.

Where parts are walked, per request shape:
- OpenAI chat: `messages[i].content` of every role (a string or an array of parts);
- Anthropic messages: `system` (string or blocks) and `messages[i].content`, into `tool_result.content`;
- OpenAI Responses: `input[i].content`, `input[i].output` (tool outputs) and `input[i].summary`;
- completions: no parts; `prompt` must be text or token ids.

Every part has a type, and each type is one of:
- text-only (`text`, `refusal`, `input_text`, `thinking`, `tool_use`, ...): passes;
- media of this shape (chat `image_url` / `video_url` / `audio_url` / `input_audio`, Responses
  `input_image`, Anthropic `image`): checked against `limits.*` and the URL policy, and priced;
- internal (`image_tensors`): made by the sidecar only; refused from clients on every route, always;
- a media type of another API shape (`image_url` in Anthropic messages): refused, naming the right form;
- anything else, including vLLM's `image_embeds` (tensors vLLM unpickles): refused with 400 unless
  listed in `limits.allowed_part_types`, in which case it is forwarded as the client sent it.

Nothing a client sends may hold the event loop: the walk stops at the first limit crossed
(`limits.max_messages_per_request`, `limits.max_parts_per_request`, `limits.max_images_per_request`),
so its cost is bounded by the limits, not by the body. The price of an inline image is read from
its header (only a bounded base64 prefix is decoded), never from a decode.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

from preprocess.cost import CostError, output_nbytes
from preprocess.extents import reservation_size
from preprocess.fetch import host_allowed
from preprocess.probe import ImageHeader
from preprocess.processors import ProcessorSpec
from preprocess.sources import (
    DeepHeader,
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
from .hollow import Texts
from .translate import TranslationError

ApiKind = Literal["chat", "completions", "responses", "messages"]
MediaKind = Literal["image", "video", "audio"]
JSON = dict[str, Any]

# Part types only the sidecar produces (offload mode's tensor parts). A client that sends one is
# trying to name memory it does not own: refused everywhere, whatever the config says.
INTERNAL_PART_TYPES = frozenset(("image_tensors",))

_CHAT_TEXT = frozenset(("text", "refusal"))
# `input_image` too: engines (vLLM) accept the Responses part shape in chat, so it is priced here as well.
_CHAT_MEDIA = frozenset(("image_url", "video_url", "audio_url", "input_audio", "input_image"))
_RESPONSES_TEXT = frozenset(("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"))
_RESPONSES_MEDIA = frozenset(("input_image",))
_ANTHROPIC_TEXT = frozenset(("text", "thinking", "redacted_thinking", "tool_use"))
_ANTHROPIC_MEDIA = frozenset(("image",))
# Every type some shape prices: none of them may be let through unchecked by `limits.allowed_part_types`.
PRICED_PART_TYPES = _CHAT_MEDIA | _RESPONSES_MEDIA | _ANTHROPIC_MEDIA
# Request fields that change how an engine preprocesses images (vLLM): the price assumes the
# configured processor, so a client must not change it per request.
_PREPROCESSING_FIELDS = ("mm_processor_kwargs", "media_io_kwargs")


@dataclass(slots=True)
class MediaPart:
    path: str  # where it sits in the body, e.g. "messages[2].content[1]"
    media: MediaKind
    source: Source | None  # None: referenced by file id, or audio carried as raw base64
    encoded_bytes: int  # bytes the client sent inline (0 for URLs and file ids)
    node: JSON = field(default_factory=dict, repr=False)  # the part object itself, to rewrite
    header: ImageHeader | None = None
    cost: int = 0  # bytes reserved at the gate
    deep: bool = False  # its header lies past QUICK_HEADER_BYTES: priced by `price_deep_headers`


@dataclass(frozen=True, slots=True)
class Classification:
    parts: tuple[MediaPart, ...]  # the media parts, in body order
    # Every content part the walk checked, by identity, with its category: the translators forward
    # only parts found here.
    checked: dict[int, Literal["text", "media", "allowed"]] = field(default_factory=dict, repr=False)

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

    def chat_part(self, node: JSON, path: str) -> JSON:
        """The chat-completions form of a non-text part this walk checked (for the translators).

        Media parts come back as the offload rewrite left them (a tensor part) or in chat's own
        shape; allowed unknown parts as sent. A part the walk never saw is a bug in the caller's
        traversal, and it must not reach the engine unchecked.
        """
        category = self.checked.get(id(node))
        if category is None:
            raise AssertionError(f"{path}: content part not checked by the walker")
        ptype = node.get("type")
        if category == "text":  # a text-only type with no chat form (thinking in a user turn, ...)
            raise TranslationError(f"{path}.type: {ptype!r} cannot be translated to chat completions")
        if category == "allowed" or ptype in INTERNAL_PART_TYPES or ptype not in ("image", "input_image"):
            # Chat's own media shapes, allowed types as sent, and internal parts, which here can only be
            # the sidecar's own rewrite: client ones were refused by the walk.
            return node
        if ptype == "image":  # Anthropic
            source = node["source"]
            if source.get("type") == "base64":
                url = f"data:{source['media_type']};base64,{source['data']}"
            elif source.get("type") == "url":
                url = source["url"]
            else:
                raise TranslationError(f"{path}.source.type: 'file' cannot be translated to chat completions")
            return {"type": "image_url", "image_url": {"url": url}}
        # Responses input_image
        given: Any = node.get("image_url")
        if isinstance(given, dict):
            given = given.get("url")
        if not isinstance(given, str):
            # file_id references OpenAI's file store, which the engine cannot read.
            raise TranslationError(f"{path}.file_id: uploaded files cannot be translated to chat completions")
        image_url: JSON = {"url": given}
        if node.get("detail") is not None:
            image_url["detail"] = node["detail"]
        return {"type": "image_url", "image_url": image_url}


def _bad(path: str, message: str, cause: Cause = Cause.BAD_REQUEST) -> SidecarError:
    return SidecarError(cause, f"{path}: {message}", param=path)


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


def _url_part(path: str, media: MediaKind, url: str, texts: Texts) -> MediaPart:
    try:
        source = parse_image_url(texts.view(url), media)
    except SourceError as exc:
        raise _bad(path, str(exc), Cause.BAD_IMAGE) from None
    encoded = source.nbytes if isinstance(source, InlineImage) else 0
    return MediaPart(path, media, source, encoded)


def _chat_media(path: str, ptype: str, part: JSON, texts: Texts) -> MediaPart:
    if ptype == "input_image":
        return _responses_media(path, ptype, part, texts)
    if ptype == "image_url":
        return _url_part(path, "image", _url_field(path, part.get("image_url"), "image_url"), texts)
    if ptype == "video_url":
        return _url_part(path, "video", _url_field(path, part.get("video_url"), "video_url"), texts)
    if ptype == "audio_url":
        return _url_part(path, "audio", _url_field(path, part.get("audio_url"), "audio_url"), texts)
    audio = part.get("input_audio")
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str) or not data:
        raise _bad(f"{path}.input_audio", "must be an object with a non-empty base64 string 'data'")
    return MediaPart(path, "audio", None, InlineImage(None, texts.view(data)).nbytes)


def _responses_media(path: str, ptype: str, part: JSON, texts: Texts) -> MediaPart:
    url, file_id = part.get("image_url"), part.get("file_id")
    if isinstance(url, dict):  # tolerated: some clients send the chat shape here
        url = url.get("url")
    if isinstance(url, str) and url:
        return _url_part(path, "image", url, texts)
    if isinstance(file_id, str) and file_id:
        return MediaPart(path, "image", None, 0)
    raise _bad(path, "input_image needs a non-empty string 'image_url' or 'file_id'")


def _anthropic_media(path: str, ptype: str, block: JSON, texts: Texts) -> MediaPart:
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
        inline = InlineImage(media_type, texts.view(data))
        return MediaPart(path, "image", inline, inline.nbytes)
    if stype == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise _bad(f"{path}.source.url", "must be a non-empty string")
        return _url_part(path, "image", url, texts)
    if stype == "file":
        if not isinstance(source.get("file_id"), str):
            raise _bad(f"{path}.source.file_id", "must be a string")
        return MediaPart(path, "image", None, 0)
    raise _bad(f"{path}.source.type", f"must be 'base64', 'url' or 'file', got {stype!r}")


@dataclass(frozen=True, slots=True)
class _Shape:
    """What one API shape's content parts may be."""

    name: str
    text: frozenset[str]
    media: frozenset[str]
    parse_media: Callable[[str, str, JSON, Texts], MediaPart]
    containers: frozenset[str]  # part types holding parts of their own in `content`
    hint: str  # how this shape spells an image, for the refusal of another shape's media type

    @property
    def article(self) -> str:
        return "an" if self.name[0] in "AEIOU" else "a"


_CHAT = _Shape("chat completions", _CHAT_TEXT, _CHAT_MEDIA, _chat_media, frozenset(), '{"type": "image_url", ...}')
_RESPONSES = _Shape(
    "Responses", _RESPONSES_TEXT, _RESPONSES_MEDIA, _responses_media, frozenset(), '{"type": "input_image", ...}'
)
_ANTHROPIC = _Shape(
    "Anthropic", _ANTHROPIC_TEXT, _ANTHROPIC_MEDIA, _anthropic_media, frozenset(("tool_result",)), '{"type": "image"}'
)


class _Walk:
    """One request's walk: the counters the limits bound, and what was found."""

    def __init__(self, limits: LimitsConfig, texts: Texts) -> None:
        self.limits = limits
        self.texts = texts  # how a string holding base64 runs left in the body's buffer reads
        self.allowed = frozenset(limits.allowed_part_types)
        self.media: list[MediaPart] = []
        self.checked: dict[int, Literal["text", "media", "allowed"]] = {}
        self.parts = 0

    def messages(self, path: str, value: object) -> list[Any]:
        if not isinstance(value, list):
            raise _bad(path, f"must be an array, got {_type_of(value)}")
        cap = self.limits.max_messages_per_request
        if len(value) > cap:
            raise _bad(
                f"{path}[{cap}]",
                f"request has {len(value)} {path} entries, more than limits.max_messages_per_request={cap}",
                Cause.TOO_MANY_PARTS,
            )
        return value

    def content(self, path: str, content: object, shape: _Shape) -> None:
        if content is None or isinstance(content, str):
            return
        if not isinstance(content, list):
            raise _bad(path, f"must be a string or an array of content parts, got {_type_of(content)}")
        for j, part in enumerate(content):
            self.part(f"{path}[{j}]", part, shape)

    def part(self, where: str, part: object, shape: _Shape) -> None:
        self.parts += 1
        cap = self.limits.max_parts_per_request
        if self.parts > cap:
            # Counted as they are walked: the walk stops here, whatever follows in the body.
            raise _bad(
                where, f"request has more than limits.max_parts_per_request={cap} content parts", Cause.TOO_MANY_PARTS
            )
        if not isinstance(part, dict):
            raise _bad(where, f"content part must be an object, got {_type_of(part)}")
        ptype = part.get("type")
        if not isinstance(ptype, str):
            raise _bad(f"{where}.type", f"must be a string, got {_type_of(ptype)}")
        if ptype in INTERNAL_PART_TYPES:
            raise _bad(
                f"{where}.type",
                f"{ptype!r} parts are made by the sidecar itself; clients cannot send them",
                Cause.FORBIDDEN_PART,
            )
        if ptype in shape.text:
            self.checked[id(part)] = "text"
        elif ptype in shape.media:
            self.add_media(shape.parse_media(where, ptype, part, self.texts), part)
        elif ptype in shape.containers:  # Anthropic tool_result: its own blocks, same rules
            self.checked[id(part)] = "text"
            self.content(f"{where}.content", part.get("content"), shape)
        elif ptype in PRICED_PART_TYPES:
            raise _bad(
                f"{where}.type",
                f"{ptype!r} is not {shape.article} {shape.name} content part type; send media here as {shape.hint}",
                Cause.UNSUPPORTED_PART,
            )
        elif ptype in self.allowed:
            self.checked[id(part)] = "allowed"
        else:
            raise _bad(
                f"{where}.type",
                f"content part type {ptype!r} is not supported here (the operator may allow it in "
                "limits.allowed_part_types)",
                Cause.UNSUPPORTED_PART,
            )

    def add_media(self, found: MediaPart, node: JSON) -> None:
        cap = self.limits.max_images_per_request
        if len(self.media) >= cap:
            raise _bad(
                found.path,
                f"request has more than limits.max_images_per_request={cap} media parts",
                Cause.TOO_MANY_IMAGES,
            )
        found.node = node
        self.media.append(found)
        self.checked[id(node)] = "media"


def _walk_message_list(walk: _Walk, body: JSON, shape: _Shape) -> None:
    for i, message in enumerate(walk.messages("messages", body.get("messages"))):
        if not isinstance(message, dict):
            raise _bad(f"messages[{i}]", f"must be an object, got {_type_of(message)}")
        walk.content(f"messages[{i}].content", message.get("content"), shape)


def _walk_chat(walk: _Walk, body: JSON) -> None:
    _walk_message_list(walk, body, _CHAT)


def _walk_messages(walk: _Walk, body: JSON) -> None:
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        walk.content("system", system, _ANTHROPIC)
    _walk_message_list(walk, body, _ANTHROPIC)


def _walk_responses(walk: _Walk, body: JSON) -> None:
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions", f"must be a string, got {_type_of(instructions)}")
    items = body.get("input")
    if items is None or isinstance(items, str):
        return
    if not isinstance(items, list):
        raise _bad("input", f"must be a string or an array, got {_type_of(items)}")
    for i, item in enumerate(walk.messages("input", items)):
        if not isinstance(item, dict):
            raise _bad(f"input[{i}]", f"must be an object, got {_type_of(item)}")
        for key in ("content", "output", "summary"):  # message content, tool output, reasoning summary
            if key in item:
                walk.content(f"input[{i}].{key}", item[key], _RESPONSES)


def _walk_completions(walk: _Walk, body: JSON) -> None:
    prompt = body.get("prompt")
    if prompt is None or isinstance(prompt, str):
        return
    if not isinstance(prompt, list):
        raise _bad("prompt", f"must be a string, an array of strings or token ids, got {_type_of(prompt)}")
    for i, item in enumerate(prompt):
        # Text, token ids, or a batch of either: nothing here can carry media.
        ok = isinstance(item, str | int) and not isinstance(item, bool)
        if not ok and isinstance(item, list):
            ok = all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        if not ok:
            raise _bad(f"prompt[{i}]", f"must be a string, a token id or an array of token ids, got {_type_of(item)}")


_WALKERS: dict[str, Callable[[_Walk, JSON], None]] = {
    "chat": _walk_chat,
    "messages": _walk_messages,
    "responses": _walk_responses,
    "completions": _walk_completions,
}


def walk(kind: ApiKind, body: JSON, limits: LimitsConfig, texts: Texts | None = None) -> Classification:
    """Find and check the shape of every content part (no pricing); raises SidecarError naming the first bad one.

    `texts`: the body's runs left in its buffer (`hollow.parse_body`), for a body parsed hollow."""
    w = _Walk(limits, texts if texts is not None else Texts())
    _WALKERS[kind](w, body)
    if body.get("prompt_embeds") is not None and "prompt_embeds" not in w.allowed:
        # vLLM reads these as tensors (torch.load): never forwarded unless the operator allows it.
        raise _bad(
            "prompt_embeds",
            "tensor inputs are not accepted (the operator may allow them in limits.allowed_part_types)",
            Cause.UNSUPPORTED_PART,
        )
    if w.media:
        for name in _PREPROCESSING_FIELDS:
            if body.get(name) is not None:
                raise _bad(
                    name,
                    "changes how the engine preprocesses media, which the sidecar prices from its own "
                    "processor settings; not accepted",
                    Cause.UNSUPPORTED_PART,
                )
    return Classification(tuple(w.media), w.checked)


def classify(
    kind: ApiKind,
    body: JSON,
    limits: LimitsConfig,
    gate: GateConfig,
    spec: ProcessorSpec | None = None,
    *,
    texts: Texts | None = None,
    quick: bool = False,
) -> Classification:
    """Find, check and price every content part; raises SidecarError naming the first offending part.

    Remote images are checked against the URL policy here and priced later, once fetched
    (`price_image`); until then they carry no cost.
    """
    found = walk(kind, body, limits, texts)
    for part in found.parts:
        _check_and_price(part, limits, gate, spec, quick)
    return found


async def price_deep_headers(
    found: Classification, limits: LimitsConfig, spec: ProcessorSpec | None, executor: Executor | None
) -> None:
    """Probe and price, in `executor`, the images `classify(quick=True)` left: those whose header lies
    past QUICK_HEADER_BYTES (up to limits.max_header_bytes: ~5 ms of decoding a MiB, never on the loop)."""
    loop = asyncio.get_running_loop()
    for part in found.parts:
        if not part.deep:
            continue
        assert isinstance(part.source, InlineImage)  # only inline images are probed
        probe_deep = functools.partial(
            header_prefix, part.source.b64, max_bytes=limits.max_header_bytes, pause=_hand_back_the_gil
        )
        try:
            header = await loop.run_in_executor(executor, probe_deep)
        except SourceError as exc:
            raise _refuse(Cause.BAD_IMAGE, part, str(exc)) from None
        part.deep = False
        price_image(part, header, limits, spec)


# Decoded on the loop before a header is left to a thread: a phone photo's 64 KiB EXIF APP1 and its
# frame header behind it (~0.5 ms of decoding).
QUICK_HEADER_BYTES = 128 << 10


def _hand_back_the_gil() -> None:
    # A real sleep, not sleep(0): the thread must be off the GIL long enough for the loop to take it.
    time.sleep(0.0001)


def _refuse(cause: Cause, part: MediaPart, message: str) -> SidecarError:
    return SidecarError(cause, f"{part.path}: {message}", param=part.path)


def _check_and_price(
    part: MediaPart, limits: LimitsConfig, gate: GateConfig, spec: ProcessorSpec | None, quick: bool = False
) -> None:
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
            quick_bytes = QUICK_HEADER_BYTES if quick else None
            header = header_prefix(source.b64, max_bytes=limits.max_header_bytes, quick_bytes=quick_bytes)
        except DeepHeader:
            part.deep = True  # priced by price_deep_headers, before admission
            return
        except SourceError as exc:
            raise _refuse(Cause.BAD_IMAGE, part, str(exc)) from None
        price_image(part, header, limits, spec)
    else:
        part.cost = gate.unknown_image_bytes


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


__all__ = [
    "INTERNAL_PART_TYPES",
    "PRICED_PART_TYPES",
    "ApiKind",
    "Classification",
    "MediaPart",
    "classify",
    "price_deep_headers",
    "price_image",
    "walk",
]
