"""Tests for sidecar.classify (find, check and price media parts) and preprocess.sources."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from preprocess.sources import (
    InlineImage,
    RemoteImage,
    SourceError,
    b64_decoded_len,
    check_b64_shape,
    header_prefix,
    parse_data_url,
    parse_image_url,
)
from sidecar.classify import Classification, MediaPart, classify, walk
from sidecar.config import GateConfig, LimitsConfig, Size
from sidecar.errors import Cause, SidecarError

UNKNOWN = 1_234_567
GATE = GateConfig(unknown_image_bytes=Size(UNKNOWN))
LIMITS = LimitsConfig()
REMOTE = LimitsConfig(allow_remote_urls=True)


# --------------------------------------------------------------------------- helpers


def image(width: int = 32, height: int = 24, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buf, fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(width: int = 32, height: int = 24, fmt: str = "PNG") -> str:
    mime = "image/jpeg" if fmt == "JPEG" else f"image/{fmt.lower()}"
    return f"data:{mime};base64,{b64(image(width, height, fmt))}"


def png_header(width: int, height: int) -> bytes:
    """Just the PNG signature and an IHDR chunk: enough for the probe, no pixels at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def chat(*parts: Any, content: Any = None) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts) if content is None else content}]}


def image_url_part(url: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def responses(*parts: Any) -> dict[str, Any]:
    return {"model": "m", "input": [{"role": "user", "content": list(parts)}]}


def anthropic(*blocks: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": list(blocks)}]}


def anthropic_image(source: Any) -> dict[str, Any]:
    return {"type": "image", "source": source}


def b64_source(data: bytes, media_type: str = "image/png") -> dict[str, Any]:
    return {"type": "base64", "media_type": media_type, "data": b64(data)}


def refuse(kind: Any, body: dict[str, Any], limits: LimitsConfig = LIMITS, gate: GateConfig = GATE) -> SidecarError:
    """The SidecarError classify raises; its message starts with its param (the offending part)."""
    with pytest.raises(SidecarError) as info:
        classify(kind, body, limits, gate)
    err = info.value
    assert err.param is not None
    assert err.message.startswith(f"{err.param}: "), err.message
    assert str(err) == err.message
    return err


def only(c: Classification) -> MediaPart:
    assert len(c.parts) == 1, c.parts
    return c.parts[0]


# --------------------------------------------------------------------------- chat


def test_chat_image_url_object() -> None:
    c = classify("chat", chat({"type": "text", "text": "hi"}, image_url_part(data_url(40, 30))), LIMITS, GATE)
    assert c.kind == "multimodal"
    assert c.multimodal
    part = only(c)
    assert part.path == "messages[0].content[1]"
    assert part.media == "image"
    assert isinstance(part.source, InlineImage)
    assert part.source.media_type == "image/png"
    assert part.header is not None
    assert (part.header.format, part.header.width, part.header.height) == ("PNG", 40, 30)
    assert part.cost == 40 * 30 * 3
    assert part.encoded_bytes == len(image(40, 30))


def test_chat_image_url_bare_string() -> None:
    part = only(classify("chat", chat({"type": "image_url", "image_url": data_url(8, 9)}), LIMITS, GATE))
    assert part.path == "messages[0].content[0]"
    assert part.header is not None
    assert (part.header.width, part.header.height) == (8, 9)
    assert part.cost == 8 * 9 * 3


def test_chat_image_url_with_detail() -> None:
    body = chat({"type": "image_url", "image_url": {"url": data_url(), "detail": "high"}})
    assert only(classify("chat", body, LIMITS, GATE)).cost == 32 * 24 * 3


def test_chat_video_url() -> None:
    body = chat({"type": "video_url", "video_url": {"url": "https://videos.example.com/a.mp4"}})
    (part,) = list(walk("chat", body, LIMITS).parts)
    assert part.media == "video"
    assert isinstance(part.source, RemoteImage)
    assert part.source.host == "videos.example.com"
    assert part.encoded_bytes == 0
    # Only images are fetched and inlined by the sidecar; a remote video would be fetched by the engine.
    err = refuse("chat", body, REMOTE)
    assert err.cause is Cause.REMOTE_URL_FORBIDDEN
    assert err.message == "messages[0].content[0]: remote video URLs are not supported; send the data inline"


def test_chat_audio_url() -> None:
    body = chat({"type": "audio_url", "audio_url": "https://audio.example.com/a.wav"})
    (part,) = list(walk("chat", body, LIMITS).parts)
    assert part.media == "audio"
    assert "remote audio URLs are not supported" in refuse("chat", body, REMOTE).message


def test_chat_input_audio() -> None:
    raw = os.urandom(3000)
    body = chat({"type": "input_audio", "input_audio": {"data": b64(raw), "format": "wav"}})
    part = only(classify("chat", body, LIMITS, GATE))
    assert part.media == "audio"
    assert part.source is None
    assert part.encoded_bytes == 3000
    assert part.header is None
    assert part.cost == UNKNOWN


@pytest.mark.parametrize(
    ("ptype", "url"),
    [
        ("video_url", "data:video/mp4;base64," + b64(b"\x00\x00\x00\x18ftypmp42" + bytes(40))),
        ("audio_url", "data:audio/wav;base64," + b64(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40))),
    ],
)
def test_chat_inline_video_and_audio_data_urls(ptype: str, url: str) -> None:
    part = only(classify("chat", chat({"type": ptype, ptype: {"url": url}}), LIMITS, GATE))
    assert part.cost == UNKNOWN


@pytest.mark.parametrize(
    "content",
    [
        "just text",
        [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        [],
        None,
    ],
)
def test_chat_text_only(content: Any) -> None:
    c = classify("chat", chat(content=content), LIMITS, GATE)
    assert c.kind == "text"
    assert not c.multimodal
    assert c.parts == ()
    assert c.cost == 0
    assert c.encoded_bytes == 0


def test_chat_message_content_none_among_others() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
            {"role": "user", "content": [{"type": "text", "text": "see"}, image_url_part(data_url())]},
        ]
    }
    part = only(classify("chat", body, LIMITS, GATE))
    assert part.path == "messages[2].content[1]"


def test_chat_text_only_types_pass_and_unknown_types_are_refused() -> None:
    assert classify("chat", chat({"type": "refusal", "refusal": "no"}), LIMITS, GATE).kind == "text"
    body = chat({"type": "refusal", "refusal": "no"}, {"type": "file", "file": {"file_id": "f"}})
    err = refuse("chat", body, LIMITS)
    assert err.cause is Cause.UNSUPPORTED_PART and err.param == "messages[0].content[1].type"
    assert err.message == (
        "messages[0].content[1].type: content part type 'file' is not supported here "
        "(the operator may allow it in limits.allowed_part_types)"
    )
    # Allowed by the operator: forwarded as sent, unpriced.
    allowed = LimitsConfig(allowed_part_types=("file",))
    assert classify("chat", body, allowed, GATE).kind == "text"


def test_chat_input_image_part_counts_too() -> None:
    # Some engines accept the Responses part shape in chat; it must not slip through as text.
    part = only(classify("chat", chat({"type": "input_image", "image_url": data_url()}), LIMITS, GATE))
    assert part.media == "image"


def test_walk_order_and_paths() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [image_url_part(data_url()), {"type": "text", "text": "x"}]},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y"},
                    {"type": "video_url", "video_url": "https://v.example/x.mp4"},
                    {"type": "image_url", "image_url": "https://i.example/x.png"},
                ],
            },
        ]
    }
    parts = list(walk("chat", body, LIMITS).parts)
    assert [(p.path, p.media) for p in parts] == [
        ("messages[0].content[0]", "image"),
        ("messages[2].content[1]", "video"),
        ("messages[2].content[2]", "image"),
    ]
    # walk does not price or check limits: remote URLs are found, not refused.
    assert all(p.cost == 0 and p.header is None for p in parts)


# --------------------------------------------------------------------------- responses


def test_responses_input_string_is_text() -> None:
    c = classify("responses", {"model": "m", "input": "hello"}, LIMITS, GATE)
    assert c.kind == "text"


def test_responses_no_input_is_text() -> None:
    assert classify("responses", {"model": "m"}, LIMITS, GATE).kind == "text"


def test_responses_input_image_url_string() -> None:
    body = responses({"type": "input_text", "text": "what"}, {"type": "input_image", "image_url": data_url(5, 7)})
    part = only(classify("responses", body, LIMITS, GATE))
    assert part.path == "input[0].content[1]"
    assert part.cost == 5 * 7 * 3
    assert part.header is not None


def test_responses_input_image_file_id() -> None:
    body = responses({"type": "input_image", "file_id": "file-abc"})
    part = only(classify("responses", body, LIMITS, GATE))
    assert part.path == "input[0].content[0]"
    assert part.source is None
    assert part.encoded_bytes == 0
    assert part.header is None
    assert part.cost == UNKNOWN


def test_responses_input_image_needs_url_or_file_id() -> None:
    err = refuse("responses", responses({"type": "input_image", "detail": "auto"}))
    assert err.cause is Cause.BAD_REQUEST
    assert err.param == "input[0].content[0]"


def test_responses_function_call_output() -> None:
    body = {
        "model": "m",
        "input": [
            {"role": "user", "content": "call the tool"},
            {"type": "function_call", "call_id": "c1", "name": "shot", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [{"type": "input_text", "text": "here"}, {"type": "input_image", "image_url": data_url()}],
            },
        ],
    }
    part = only(classify("responses", body, LIMITS, GATE))
    assert part.path == "input[2].output[1]"
    assert part.cost == 32 * 24 * 3


def test_responses_function_call_output_string_is_text() -> None:
    body = {"input": [{"type": "function_call_output", "call_id": "c", "output": "plain result"}]}
    assert classify("responses", body, LIMITS, GATE).kind == "text"


# --------------------------------------------------------------------------- anthropic messages


def test_anthropic_base64_image() -> None:
    data = image(12, 34, "JPEG")
    body = anthropic({"type": "text", "text": "hi"}, anthropic_image(b64_source(data, "image/jpeg")))
    part = only(classify("messages", body, LIMITS, GATE))
    assert part.path == "messages[0].content[1]"
    assert isinstance(part.source, InlineImage)
    assert part.source.media_type == "image/jpeg"
    assert part.encoded_bytes == len(data)
    assert part.header is not None
    assert (part.header.format, part.header.width, part.header.height) == ("JPEG", 12, 34)
    assert part.cost == 12 * 34 * 3


def test_anthropic_url_image() -> None:
    body = anthropic(anthropic_image({"type": "url", "url": "https://img.example.com/cat.png"}))
    part = only(classify("messages", body, REMOTE, GATE))
    assert isinstance(part.source, RemoteImage)
    assert part.cost == 0  # priced once the sidecar has fetched it


def test_anthropic_url_source_may_be_a_data_url() -> None:
    body = anthropic(anthropic_image({"type": "url", "url": data_url(3, 4)}))
    assert only(classify("messages", body, LIMITS, GATE)).cost == 3 * 4 * 3


def test_anthropic_file_image() -> None:
    body = anthropic(anthropic_image({"type": "file", "file_id": "file_011"}))
    part = only(classify("messages", body, LIMITS, GATE))
    assert part.source is None
    assert part.cost == UNKNOWN


def test_anthropic_image_in_tool_result() -> None:
    body = anthropic(
        {
            "type": "tool_result",
            "tool_use_id": "toolu_1",
            "content": [{"type": "text", "text": "screenshot"}, anthropic_image(b64_source(image(6, 6)))],
        }
    )
    part = only(classify("messages", body, LIMITS, GATE))
    assert part.path == "messages[0].content[0].content[1]"
    assert part.cost == 6 * 6 * 3


def test_anthropic_text_only_and_string_tool_result() -> None:
    body = anthropic(
        {"type": "text", "text": "hi"},
        {"type": "tool_result", "tool_use_id": "t", "content": "42"},
        {"type": "tool_use", "id": "t", "name": "f", "input": {"image": "not a part"}},
    )
    assert classify("messages", body, LIMITS, GATE).kind == "text"
    assert classify("messages", {"messages": [{"role": "user", "content": "hello"}]}, LIMITS, GATE).kind == "text"


# --------------------------------------------------------------------------- completions


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "hello"},
        {"model": "m", "prompt": [1, 2, 3]},
        # Even a body that looks like chat with images is text on the completions route.
        chat(image_url_part(data_url())),
        {"messages": 5},
    ],
)
def test_completions_is_always_text(body: dict[str, Any]) -> None:
    c = classify("completions", body, LimitsConfig(max_images_per_request=0), GATE)
    assert c.kind == "text"
    assert list(walk("completions", body, LIMITS).parts) == []


# --------------------------------------------------------------------------- cost


def test_cost_sums_over_parts() -> None:
    body = chat(
        image_url_part(data_url(10, 10)),
        {"type": "image_url", "image_url": data_url(20, 5, "JPEG")},
        {"type": "image_url", "image_url": "https://i.example.com/a.png"},
        {"type": "video_url", "video_url": "data:video/mp4;base64,AAAA"},
        {"type": "input_audio", "input_audio": {"data": b64(b"abc"), "format": "wav"}},
        {"type": "input_image", "file_id": "f"},
    )
    c = classify("chat", body, REMOTE, GATE)
    assert [p.cost for p in c.parts] == [300, 300, 0, UNKNOWN, UNKNOWN, UNKNOWN]
    assert c.cost == 600 + 3 * UNKNOWN
    assert c.encoded_bytes == len(image(10, 10)) + len(image(20, 5, "JPEG")) + 3 + 3


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_cost_of_each_format(fmt: str) -> None:
    body = chat({"type": "image_url", "image_url": f"data:image/{fmt.lower()};base64,{b64(image(17, 11, fmt))}"})
    part = only(classify("chat", body, LIMITS, GATE))
    assert part.header is not None
    assert part.header.format == fmt
    assert part.cost == 17 * 11 * 3


def test_cost_of_a_large_image_comes_from_its_header() -> None:
    # 4000x3000 claims 36 MB of RGB; only the header is read, and the pixel limit admits it.
    body = chat({"type": "image_url", "image_url": "data:image/png;base64," + b64(png_header(4000, 3000))})
    assert only(classify("chat", body, LIMITS, GATE)).cost == 4000 * 3000 * 3


# --------------------------------------------------------------------------- limits


def test_too_many_media_parts_names_the_first_over() -> None:
    parts = [image_url_part(data_url()) for _ in range(3)]
    body = {
        "messages": [
            {"role": "user", "content": parts[:2]},
            {"role": "user", "content": [{"type": "text", "text": "and"}, parts[2]]},
        ]
    }
    err = refuse("chat", body, LimitsConfig(max_images_per_request=2))
    assert err.cause is Cause.TOO_MANY_IMAGES
    assert err.param == "messages[1].content[1]"
    # The walk stops at the first part over the limit: it never counts the rest.
    assert err.message == "messages[1].content[1]: request has more than limits.max_images_per_request=2 media parts"
    # At the limit is fine.
    assert len(classify("chat", body, LimitsConfig(max_images_per_request=3), GATE).parts) == 3


def test_media_limit_counts_video_and_audio() -> None:
    body = chat(
        {"type": "image_url", "image_url": data_url()}, {"type": "input_audio", "input_audio": {"data": "AAAA"}}
    )
    err = refuse("chat", body, LimitsConfig(max_images_per_request=1))
    assert err.cause is Cause.TOO_MANY_IMAGES
    assert err.param == "messages[0].content[1]"


def test_zero_media_limit_refuses_any_image_but_not_text() -> None:
    limits = LimitsConfig(max_images_per_request=0)
    assert refuse("chat", chat(image_url_part(data_url())), limits).param == "messages[0].content[0]"
    assert classify("chat", chat({"type": "text", "text": "x"}), limits, GATE).kind == "text"


def test_encoded_bytes_over_limit() -> None:
    data = image(64, 64)
    body = chat(image_url_part(f"data:image/png;base64,{b64(data)}"))
    err = refuse("chat", body, LimitsConfig(max_image_bytes=Size(len(data) - 1)))
    assert err.cause is Cause.IMAGE_TOO_LARGE
    assert err.param == "messages[0].content[0]"
    assert f"{len(data)} bytes" in err.message
    assert f"limits.max_image_bytes={len(data) - 1}" in err.message
    assert only(classify("chat", body, LimitsConfig(max_image_bytes=Size(len(data))), GATE)).cost == 64 * 64 * 3


def test_encoded_bytes_limit_applies_to_anthropic_and_audio() -> None:
    body = anthropic(anthropic_image(b64_source(image(64, 64))))
    assert refuse("messages", body, LimitsConfig(max_image_bytes=Size(10))).cause is Cause.IMAGE_TOO_LARGE
    audio = chat({"type": "input_audio", "input_audio": {"data": b64(bytes(100))}})
    assert refuse("chat", audio, LimitsConfig(max_image_bytes=Size(99))).cause is Cause.IMAGE_TOO_LARGE


def test_pixels_over_limit_from_a_forged_header() -> None:
    body = chat({"type": "text", "text": "x"}, image_url_part("data:image/png;base64," + b64(png_header(50000, 50000))))
    err = refuse("chat", body)
    assert err.cause is Cause.IMAGE_TOO_LARGE
    assert err.param == "messages[0].content[1]"
    assert "50000x50000" in err.message
    assert "2500000000 pixels" in err.message
    assert "limits.max_image_pixels=40000000" in err.message


def test_pixel_limit_is_inclusive() -> None:
    body = chat(image_url_part(data_url(10, 10)))
    assert only(classify("chat", body, LimitsConfig(max_image_pixels=100), GATE)).cost == 300
    assert refuse("chat", body, LimitsConfig(max_image_pixels=99)).cause is Cause.IMAGE_TOO_LARGE


def test_pixel_limit_for_anthropic() -> None:
    body = anthropic(
        anthropic_image({"type": "base64", "media_type": "image/png", "data": b64(png_header(9000, 9000))})
    )
    err = refuse("messages", body)
    assert err.cause is Cause.IMAGE_TOO_LARGE
    assert err.param == "messages[0].content[0]"


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", chat(image_url_part("https://img.example.com/a.png")), "messages[0].content[0]"),
        ("chat", chat({"type": "video_url", "video_url": "http://v.example.com/a.mp4"}), "messages[0].content[0]"),
        (
            "responses",
            responses({"type": "input_image", "image_url": "https://x.example/a.png"}),
            "input[0].content[0]",
        ),
        (
            "messages",
            anthropic(anthropic_image({"type": "url", "url": "https://x.example/a"})),
            "messages[0].content[0]",
        ),
    ],
)
def test_remote_urls_disabled(kind: Any, body: dict[str, Any], param: str) -> None:
    err = refuse(kind, body)
    assert err.cause is Cause.REMOTE_URL_FORBIDDEN
    assert err.param == param
    assert "limits.allow_remote_urls=false" in err.message


def test_remote_url_host_allow_list() -> None:
    limits = LimitsConfig(allow_remote_urls=True, allowed_hosts=("img.example.com",))
    ok = only(classify("chat", chat(image_url_part("https://IMG.example.com:8443/a.png")), limits, GATE))
    assert isinstance(ok.source, RemoteImage)
    assert ok.source.host == "img.example.com"
    assert ok.cost == 0  # priced once fetched
    for url in (
        "https://evil.example.com/a.png",
        "https://img.example.com.evil.net/a.png",
        "https://img.example.com@evil.net/a.png",  # userinfo, not the host
        "http://127.0.0.1/a.png",
    ):
        err = refuse("chat", chat(image_url_part(url)), limits)
        assert err.cause is Cause.REMOTE_URL_FORBIDDEN
        assert "limits.allowed_hosts" in err.message


def test_remote_url_any_host_when_allow_list_empty() -> None:
    part = only(classify("chat", chat(image_url_part("https://anything.example/a")), REMOTE, GATE))
    assert isinstance(part.source, RemoteImage) and part.cost == 0


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "scheme 'file' is not allowed"),
        ("ftp://files.example.com/a.png", "scheme 'ftp' is not allowed"),
        ("gopher://x/1", "scheme 'gopher' is not allowed"),
        ("/local/path.png", "expected a data: URL or an http(s):// URL"),
        ("https:///no-host.png", "URL has no host"),
        ("data:image/png,abcd", "must be base64-encoded"),
        ("data:image/png;base64", "malformed data URL"),
        ("data:image/png;base64;abcd", "malformed data URL"),
        ("data:text/plain;base64,aGVsbG8=", "'text/plain' is not an image type"),
        ("data:application/octet-stream;base64,AAAA", "is not an image type"),
    ],
)
def test_bad_urls(url: str, fragment: str) -> None:
    # Refused whatever the remote-URL settings say.
    err = refuse("chat", chat({"type": "text", "text": "x"}, image_url_part(url)), REMOTE)
    assert err.cause is Cause.BAD_IMAGE
    assert err.param == "messages[0].content[1]"
    assert fragment in err.message


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("!!!!", "invalid base64 data"),
        ("iVBORw0KGgo$AAAANSUhEUg==", "invalid base64 data"),
        ("iVBORw0KGgoA", "truncated"),  # decodes to a bare PNG signature
        ("AAAAA", "length is not a multiple of 4"),
        ("iVBORw0KGgo", "length is not a multiple of 4"),  # unpadded: refused whatever its size
        ("aGVsbG8=é", "invalid base64 data"),
        ("", "empty image data"),
        (b64(b"hello, this is plain text and not an image at all"), "unsupported image format"),
        (b64(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'), "SVG images are not supported"),
        (b64(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'), "SVG images are not supported"),
        (b64(image(8, 8)[:20]), "truncated"),
    ],
)
def test_bad_inline_image_data(payload: str, fragment: str) -> None:
    body = chat(image_url_part(f"data:image/png;base64,{payload}"))
    err = refuse("chat", body)
    assert err.cause is Cause.BAD_IMAGE
    assert err.param == "messages[0].content[0]"
    assert fragment in err.message


def test_svg_data_url() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'
    err = refuse("chat", chat(image_url_part("data:image/svg+xml;base64," + b64(svg))))
    assert err.cause is Cause.BAD_IMAGE
    assert "SVG" in err.message


def test_bad_anthropic_base64_data() -> None:
    body = anthropic({"type": "text", "text": "x"}, anthropic_image(b64_source(b"GIF89a\x01\x00")))
    err = refuse("messages", body)
    assert err.cause is Cause.BAD_IMAGE
    assert err.param == "messages[0].content[1]"
    assert "truncated" in err.message
    text = anthropic(anthropic_image(b64_source(b"plain text, not an image")))
    assert refuse("messages", text).cause is Cause.BAD_IMAGE


@pytest.mark.parametrize(
    "body", [chat(image_url_part("")), chat({"type": "image_url", "image_url": ""})], ids=["object", "string"]
)
def test_empty_url(body: dict[str, Any]) -> None:
    err = refuse("chat", body)
    assert err.cause is Cause.BAD_REQUEST
    assert err.param == "messages[0].content[0].image_url"
    assert "empty URL" in err.message


# --------------------------------------------------------------------------- malformed shapes


@pytest.mark.parametrize(
    ("kind", "body", "param", "fragment"),
    [
        ("chat", {"messages": {"role": "user"}}, "messages", "must be an array, got object"),
        ("chat", {"model": "m"}, "messages", "must be an array, got null"),
        ("chat", {"messages": "hi"}, "messages", "must be an array, got string"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "a"}, "hi"]},
            "messages[1]",
            "must be an object, got string",
        ),
        ("chat", {"messages": [[]]}, "messages[0]", "must be an object, got array"),
        ("chat", chat(content=5), "messages[0].content", "got number"),
        ("chat", chat(content={"type": "text"}), "messages[0].content", "got object"),
        ("chat", chat({"type": "text", "text": "a"}, "b"), "messages[0].content[1]", "must be an object, got string"),
        ("chat", chat(None), "messages[0].content[0]", "must be an object, got null"),
        ("chat", chat({"image_url": {"url": "https://x/a.png"}}), "messages[0].content[0].type", "got null"),
        ("chat", chat({"type": 3}), "messages[0].content[0].type", "must be a string, got number"),
        ("chat", chat({"type": "image_url", "image_url": 7}), "messages[0].content[0].image_url", "got number"),
        ("chat", chat({"type": "image_url"}), "messages[0].content[0].image_url", "got null"),
        ("chat", chat({"type": "image_url", "image_url": [1]}), "messages[0].content[0].image_url", "got array"),
        ("chat", chat(image_url_part(7)), "messages[0].content[0].image_url.url", "must be a string, got number"),
        ("chat", chat({"type": "image_url", "image_url": {}}), "messages[0].content[0].image_url.url", "got null"),
        ("chat", chat({"type": "video_url", "video_url": True}), "messages[0].content[0].video_url", "got boolean"),
        ("chat", chat({"type": "audio_url", "audio_url": {"url": 1}}), "messages[0].content[0].audio_url.url", ""),
        ("chat", chat({"type": "input_audio", "input_audio": "AAAA"}), "messages[0].content[0].input_audio", ""),
        ("chat", chat({"type": "input_audio", "input_audio": {"data": ""}}), "messages[0].content[0].input_audio", ""),
        ("responses", {"input": 5}, "input", "must be a string or an array, got number"),
        ("responses", {"input": ["hi"]}, "input[0]", "must be an object, got string"),
        ("responses", {"input": [{"role": "user", "content": 1.5}]}, "input[0].content", "got number"),
        ("responses", responses({"type": "input_image", "image_url": 5}), "input[0].content[0]", "image_url"),
        ("responses", responses({"type": "input_image", "file_id": ""}), "input[0].content[0]", "file_id"),
        ("messages", {"messages": 1}, "messages", "must be an array"),
        ("messages", anthropic({"type": "image"}), "messages[0].content[0].source", "must be an object, got null"),
        ("messages", anthropic(anthropic_image("abc")), "messages[0].content[0].source", "got string"),
        (
            "messages",
            anthropic(anthropic_image({"type": "path", "path": "/etc/passwd"})),
            "messages[0].content[0].source.type",
            "'path'",
        ),
        ("messages", anthropic(anthropic_image({"data": "AAAA"})), "messages[0].content[0].source.type", "None"),
        (
            "messages",
            anthropic(anthropic_image({"type": "base64", "media_type": "image/png", "data": 12})),
            "messages[0].content[0].source.data",
            "non-empty base64 string",
        ),
        (
            "messages",
            anthropic(anthropic_image({"type": "base64", "media_type": "image/png", "data": ""})),
            "messages[0].content[0].source.data",
            "",
        ),
        (
            "messages",
            anthropic(anthropic_image({"type": "base64", "media_type": "text/plain", "data": "AAAA"})),
            "messages[0].content[0].source.media_type",
            "must be an image media type, got 'text/plain'",
        ),
        (
            "messages",
            anthropic(anthropic_image({"type": "base64", "data": "AAAA"})),
            "messages[0].content[0].source.media_type",
            "got None",
        ),
        (
            "messages",
            anthropic(anthropic_image({"type": "url", "url": 5})),
            "messages[0].content[0].source.url",
            "non-empty string",
        ),
        (
            "messages",
            anthropic(anthropic_image({"type": "file", "file_id": None})),
            "messages[0].content[0].source.file_id",
            "must be a string",
        ),
        (
            "messages",
            anthropic({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}),
            "messages[0].content[0].content[0].source",
            "",
        ),
        (
            "messages",
            anthropic({"type": "tool_result", "tool_use_id": "t", "content": 5}),
            "messages[0].content[0].content",
            "got number",
        ),
    ],
)
def test_malformed_shapes(kind: Any, body: dict[str, Any], param: str, fragment: str) -> None:
    err = refuse(kind, body, REMOTE)
    assert err.cause is Cause.BAD_REQUEST
    assert err.param == param
    assert fragment in err.message
    assert err.status == 400


def test_first_error_wins_in_body_order() -> None:
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x"}, image_url_part("ftp://a/b")]},
            {"role": "user", "content": 5},
        ]
    }
    err = refuse("chat", body)
    assert (err.cause, err.param) == (Cause.BAD_IMAGE, "messages[0].content[1]")


def test_shape_errors_come_before_limit_checks() -> None:
    # The walk validates the whole body's shape; limits (remote URLs, sizes) are checked after it.
    body = {
        "messages": [
            {"role": "user", "content": [image_url_part("https://img.example.com/a.png")]},
            {"role": "user", "content": 5},
        ]
    }
    err = refuse("chat", body)
    assert (err.cause, err.param) == (Cause.BAD_REQUEST, "messages[1].content")


# --------------------------------------------------------------------------- preprocess.sources


@pytest.mark.parametrize("n", range(65))
def test_b64_decoded_len(n: int) -> None:
    raw = os.urandom(n)
    padded = b64(raw)
    assert b64_decoded_len(padded) == len(base64.b64decode(padded)) == n
    assert b64_decoded_len(padded.rstrip("=")) == n  # unpadded base64 has the same length


def test_b64_decoded_len_needs_no_decode() -> None:
    # A length is all it reads: a huge payload is measured without touching its bytes.
    assert b64_decoded_len("A" * 40_000_000) == 30_000_000


def test_header_prefix_finds_jpeg_sof_behind_a_large_app_segment() -> None:
    icc = os.urandom(200_000)
    data = image(321, 123, "JPEG", icc_profile=icc)
    # PIL writes the ICC profile in APP2 segments before the frame header (SOF).
    assert data.index(icc[-64:]) > 200_000
    header = header_prefix(b64(data))
    assert (header.format, header.width, header.height, header.mode) == ("JPEG", 321, 123, "RGB")


def test_classify_prices_jpeg_with_large_app_segment() -> None:
    data = image(50, 40, "JPEG", icc_profile=os.urandom(200_000))
    part = only(classify("chat", chat(image_url_part("data:image/jpeg;base64," + b64(data))), LIMITS, GATE))
    assert part.cost == 50 * 40 * 3
    assert part.encoded_bytes == len(data)


def test_header_prefix_truncated_jpeg() -> None:
    data = image(40, 30, "JPEG", icc_profile=os.urandom(20_000))
    cut = data[: data.find(b"\xff\xc0")]
    with pytest.raises(SourceError, match="truncated"):
        header_prefix(b64(cut))


def test_header_prefix_small_start() -> None:
    data = image(99, 77, "PNG")
    assert header_prefix(b64(data), start=8).width == 99


def test_parse_image_url() -> None:
    inline = parse_image_url("DATA:Image/PNG;charset=x;BASE64,AAAA")
    assert inline == InlineImage(media_type="image/png", b64="AAAA")
    assert parse_data_url("data:;base64,AAAA") == InlineImage(media_type=None, b64="AAAA")
    remote = parse_image_url("HTTPS://Example.COM/a.png?x=1")
    assert remote == RemoteImage(url="HTTPS://Example.COM/a.png?x=1", host="example.com")


@pytest.mark.parametrize("bad", ["", "A", "AA", "AAA", "AAAAA", "AAA!", "AA=A", "A==="])
def test_check_b64_shape_rejects(bad: str) -> None:
    with pytest.raises(SourceError):
        check_b64_shape(bad)


@pytest.mark.parametrize("good", ["AAAA", "AA==", "AAA=", b64(os.urandom(30))])
def test_check_b64_shape_accepts(good: str) -> None:
    check_b64_shape(good)
