"""Tests for preprocess.probe (and the prefix search in preprocess.sources): agreement with PIL,
truncation, headers PIL reads past, the bound on where a header may end, hostile headers, fuzzing."""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import random
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from preprocess import sources
from preprocess.probe import (
    DEFAULT_MAX_HEADER_BYTES,
    WALK_LIMITS,
    ImageHeader,
    NeedMoreData,
    ProbeError,
    probe,
    sniff_format,
)
from preprocess.sources import SourceError, header_prefix

# --------------------------------------------------------------------------- helpers


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(size: tuple[int, int] = (7, 5)) -> Image.Image:
    # Non-gray colours so GIF/BMP keep a real palette (PIL reports gray ramps as "L").
    return Image.new("RGB", size, (10, 200, 30))


def _frames(n: int, size: tuple[int, int] = (7, 5)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i, 255 - 40 * i, 7 * i)) for i in range(1, n + 1)]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I4s", len(data), ctype) + data + struct.pack(">I", zlib.crc32(ctype + data))


def _png(width: int, height: int, *chunks: bytes, depth: int = 8, color: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(chunks)


def _jpeg_sof(width: int, height: int, components: int = 3) -> bytes:
    body = struct.pack(">BHHB", 8, height, width, components) + b"\x01\x22\x00" * components
    return b"\xff\xc0" + struct.pack(">H", len(body) + 2) + body


# A start of scan for one component: where a JPEG's header ends.
_JPEG_SOS = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"


def _jpeg_app(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)


def _gif_image(x: int, y: int, w: int, h: int) -> bytes:
    return b"\x2c" + struct.pack("<HHHHB", x, y, w, h, 0) + b"\x02\x02\x4c\x01\x00"


def _pil_info(data: bytes) -> tuple[str | None, tuple[int, int], str, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size, im.mode, getattr(im, "n_frames", 1)


# --------------------------------------------------------------------------- agreement with PIL

Maker = Callable[[], bytes]

CASES: dict[str, Maker] = {
    "jpeg-baseline": lambda: _encode(_rgb(), "JPEG"),
    "jpeg-progressive": lambda: _encode(_rgb(), "JPEG", progressive=True),
    "jpeg-cmyk": lambda: _encode(_rgb().convert("CMYK"), "JPEG"),
    "jpeg-gray": lambda: _encode(_rgb().convert("L"), "JPEG"),
    "jpeg-exif-6": lambda: _encode(_rgb(), "JPEG", exif=_exif(6)),
    "jpeg-exif-3": lambda: _encode(_rgb(), "JPEG", exif=_exif(3)),
    "jpeg-icc-70k": lambda: _encode(_rgb(), "JPEG", icc_profile=bytes(range(256)) * 280),
    "jpeg-1x1": lambda: _encode(_rgb((1, 1)), "JPEG"),
    "jpeg-5000x3": lambda: _encode(_rgb((5000, 3)), "JPEG"),
    "jpeg-3x5000": lambda: _encode(_rgb((3, 5000)), "JPEG"),
    "png-rgb": lambda: _encode(_rgb(), "PNG"),
    "png-rgba": lambda: _encode(_rgb().convert("RGBA"), "PNG"),
    "png-p": lambda: _encode(_rgb().convert("P"), "PNG"),
    "png-l": lambda: _encode(_rgb().convert("L"), "PNG"),
    "png-la": lambda: _encode(_rgb().convert("LA"), "PNG"),
    "png-1bit": lambda: _encode(_rgb().convert("1"), "PNG"),
    "png-16bit": lambda: _encode(Image.new("I;16", (4, 3), 40000), "PNG"),
    "png-exif-6": lambda: _encode(_rgb(), "PNG", exif=_exif(6)),
    "png-1x1": lambda: _encode(_rgb((1, 1)), "PNG"),
    "png-5000x3": lambda: _encode(_rgb((5000, 3)), "PNG"),
    "png-3x5000": lambda: _encode(_rgb((3, 5000)), "PNG"),
    "apng-3": lambda: _encode(_rgb(), "PNG", save_all=True, append_images=_frames(2)),
    "gif-single": lambda: _encode(_rgb(), "GIF"),
    "gif-animated-5": lambda: _encode(_rgb(), "GIF", save_all=True, append_images=_frames(4)),
    "gif-1x1": lambda: _encode(_rgb((1, 1)), "GIF"),
    "gif-5000x3": lambda: _encode(_rgb((5000, 3)), "GIF"),
    "gif-3x5000": lambda: _encode(_rgb((3, 5000)), "GIF"),
    "webp-lossy": lambda: _encode(_rgb(), "WEBP"),
    "webp-lossless": lambda: _encode(_rgb(), "WEBP", lossless=True),
    "webp-alpha-lossy": lambda: _encode(Image.new("RGBA", (7, 5), (1, 2, 3, 100)), "WEBP"),
    "webp-alpha-lossless": lambda: _encode(Image.new("RGBA", (7, 5), (1, 2, 3, 100)), "WEBP", lossless=True),
    "webp-animated-4": lambda: _encode(_rgb(), "WEBP", save_all=True, append_images=_frames(3)),
    "webp-exif-6": lambda: _encode(_rgb(), "WEBP", exif=_exif(6)),
    "webp-1x1": lambda: _encode(_rgb((1, 1)), "WEBP"),
    "webp-5000x3": lambda: _encode(_rgb((5000, 3)), "WEBP"),
    "webp-3x5000": lambda: _encode(_rgb((3, 5000)), "WEBP", lossless=True),
    "bmp-rgb": lambda: _encode(_rgb(), "BMP"),
    "bmp-l": lambda: _encode(_rgb().convert("L"), "BMP"),
    "bmp-1bit": lambda: _encode(_rgb().convert("1"), "BMP"),
    "bmp-p": lambda: _encode(_rgb().convert("P"), "BMP"),
    "bmp-1x1": lambda: _encode(_rgb((1, 1)), "BMP"),
    "bmp-5000x3": lambda: _encode(_rgb((5000, 3)), "BMP"),
    "bmp-3x5000": lambda: _encode(_rgb((3, 5000)), "BMP"),
    "tiff-rgb": lambda: _encode(_rgb(), "TIFF"),
    "tiff-rgba": lambda: _encode(_rgb().convert("RGBA"), "TIFF"),
    "tiff-l": lambda: _encode(_rgb().convert("L"), "TIFF"),
    "tiff-1bit": lambda: _encode(_rgb().convert("1"), "TIFF"),
    "tiff-cmyk": lambda: _encode(_rgb().convert("CMYK"), "TIFF"),
    "tiff-p": lambda: _encode(_rgb().convert("P"), "TIFF"),
    "tiff-3-pages": lambda: _encode(_rgb(), "TIFF", save_all=True, append_images=_frames(2)),
    "tiff-exif-6": lambda: _encode(_rgb(), "TIFF", exif=_exif(6)),
    "tiff-5000x3": lambda: _encode(_rgb((5000, 3)), "TIFF"),
}

EXPECTED_ORIENTATION = {"jpeg-exif-6": 6, "jpeg-exif-3": 3, "png-exif-6": 6, "webp-exif-6": 6, "tiff-exif-6": 6}


@pytest.fixture(scope="module")
def samples() -> dict[str, bytes]:
    return {name: make() for name, make in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pil(name: str, samples: dict[str, bytes]) -> None:
    data = samples[name]
    header = probe(data)
    fmt, size, mode, n_frames = _pil_info(data)
    assert header.format == fmt
    assert sniff_format(data) == fmt
    if fmt == "TIFF":
        # PIL's TIFF plugin reports the size after applying the orientation tag.
        assert header.display_size == size
    else:
        assert (header.width, header.height) == size
    assert header.mode == mode
    assert header.frames == n_frames
    assert header.orientation == EXPECTED_ORIENTATION.get(name, 1)


def test_exif_orientation_swaps_display_size(samples: dict[str, bytes]) -> None:
    header = probe(samples["jpeg-exif-6"])
    assert (header.width, header.height) == (7, 5)
    assert header.display_size == (5, 7)
    with Image.open(io.BytesIO(samples["jpeg-exif-6"])) as im:
        assert im.getexif()[0x0112] == 6
    assert probe(samples["jpeg-exif-3"]).display_size == (7, 5)


def test_accepts_memoryview_and_bytearray(samples: dict[str, bytes]) -> None:
    data = samples["png-rgb"]
    assert probe(memoryview(data)) == probe(data)
    assert probe(bytearray(data)) == probe(data)  # type: ignore[arg-type]
    assert probe(memoryview(b"xx" + data)[2:]) == probe(data)


def test_header_is_frozen_and_hashable() -> None:
    header = ImageHeader("PNG", 3, 4, "RGB", 1, 8)
    assert header.display_size == (4, 3)
    with pytest.raises(AttributeError):
        header.width = 5  # type: ignore[misc]
    assert hash(header) == hash(ImageHeader("PNG", 3, 4, "RGB", 1, 8))


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "name", ["jpeg-baseline", "jpeg-exif-6", "png-rgb", "apng-3", "gif-animated-5", "webp-exif-6", "bmp-p"]
)
def test_every_prefix_needs_more_or_is_right(name: str, samples: dict[str, bytes]) -> None:
    data = samples[name]
    full = probe(data)
    for cut in range(1, len(data) + 1):
        prefix = data[:cut]
        try:
            header = probe(prefix)
        except NeedMoreData as exc:
            # The lower bound must be honest: more than we gave, no more than the whole file.
            if exc.need is not None:
                assert cut < exc.need <= len(data) + 4, (cut, exc.need)
            continue
        assert (header.format, header.width, header.height, header.mode) == (
            full.format,
            full.width,
            full.height,
            full.mode,
        ), cut
        if header.frames is not None:
            assert header.frames == full.frames, cut
            assert header.orientation == full.orientation, cut


def test_need_makes_progress(samples: dict[str, bytes]) -> None:
    """Feeding exactly `need` bytes either succeeds or asks for strictly more."""
    for name in ("jpeg-icc-70k", "png-rgb", "gif-single", "webp-lossless", "bmp-rgb", "tiff-rgb"):
        data = samples[name]
        cut, rounds = 1, 0
        while True:
            rounds += 1
            assert rounds < 20, name
            try:
                probe(data[:cut])
                break
            except NeedMoreData as exc:
                assert exc.need is not None and exc.need > cut, (name, cut)
                cut = exc.need


def test_large_app_segment_needs_only_its_end(samples: dict[str, bytes]) -> None:
    data = samples["jpeg-icc-70k"]
    with pytest.raises(NeedMoreData) as info:
        probe(data[:300])
    assert info.value.need is not None and info.value.need > 60_000


def test_png_prefix_before_idat_needs_more_but_says_what_it_read() -> None:
    # A chunk before IDAT could still be a second IHDR, so a prefix that ends before IDAT is no
    # answer yet; `header` is the answer if those bytes are the whole file.
    data = _png(9, 4, _png_chunk(b"tEXt", b"k\x00" + b"v" * 500), _png_chunk(b"IDAT", b""))
    with pytest.raises(NeedMoreData, match="truncated PNG header") as info:
        probe(data[:100])
    assert info.value.header == ImageHeader("PNG", 9, 4, "RGB", None, 1)
    assert info.value.need == data.index(b"IDAT") + 4  # the IDAT chunk's length and type
    assert probe(data).frames == 1
    with pytest.raises(NeedMoreData, match="truncated PNG header") as info:
        probe(data[:20])
    assert info.value.need == 29 and info.value.header is None


def test_gif_partial_walk_has_unknown_frames(samples: dict[str, bytes]) -> None:
    data = samples["gif-animated-5"]
    header = probe(data[:-1])  # no trailer
    assert header.frames is None
    assert (header.width, header.height) == (7, 5)


def test_need_more_data_pickles() -> None:
    exc = NeedMoreData("truncated PNG header", 29, ImageHeader("PNG", 3, 4, "RGB", None, 1))
    copy = pickle.loads(pickle.dumps(exc))
    assert isinstance(copy, NeedMoreData)
    assert (str(copy), copy.need, copy.header) == ("truncated PNG header", 29, exc.header)


@pytest.mark.parametrize(
    ("prefix", "need"),
    [(b"\x89PN", 8), (b"\xff\xd8", 3), (b"GIF8", 6), (b"RIFF\x10\x00", 12), (b"II", 4), (b"B", 2)],
)
def test_magic_prefix_needs_more(prefix: bytes, need: int) -> None:
    with pytest.raises(NeedMoreData) as info:
        probe(prefix)
    assert info.value.need == need


# --------------------------------------------------------------------------- hostile headers


def test_png_huge_claimed_dimensions_are_reported() -> None:
    data = _png(50_000, 50_000, _png_chunk(b"IDAT", b""))
    assert probe(data) == ImageHeader("PNG", 50_000, 50_000, "RGB", 1, 1)
    huge = _png(2**31 - 1, 2**24 + 1, _png_chunk(b"IDAT", b""))
    assert (probe(huge).width, probe(huge).height) == (2**31 - 1, 2**24 + 1)


def test_png_zero_dimension() -> None:
    with pytest.raises(ProbeError, match="zero dimension"):
        probe(_png(0, 5))


def test_png_bad_ihdr() -> None:
    bad_len = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4s", 12, b"IHDR") + b"\x00" * 20
    with pytest.raises(ProbeError, match="IHDR"):
        probe(bad_len)
    not_first = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"tEXt", b"a\x00b") + b"\x00" * 20
    with pytest.raises(ProbeError, match="IHDR"):
        probe(not_first)
    with pytest.raises(ProbeError, match="bit depth"):
        probe(_png(5, 5, depth=3, color=2))


def test_png_chunk_length_past_end() -> None:
    data = _png(5, 6, struct.pack(">I4s", 0x7FFF_FFF0, b"tEXt") + b"abc")
    with pytest.raises(NeedMoreData) as info:
        probe(data)
    assert info.value.header == ImageHeader("PNG", 5, 6, "RGB", None, 1)
    assert info.value.need is not None and info.value.need > 0x7FFF_FFF0
    with pytest.raises(ProbeError, match="chunk length"):
        probe(_png(5, 6, struct.pack(">I4s", 0xFFFF_FFFF, b"tEXt") + b"abc"))


def test_png_actl_and_exif_chunks() -> None:
    actl = _png_chunk(b"acTL", struct.pack(">II", 7, 0))
    assert probe(_png(5, 6, actl, _png_chunk(b"IDAT", b""))).frames == 7
    # A second acTL invalidates the animation, as in PIL.
    assert probe(_png(5, 6, actl, actl, _png_chunk(b"IDAT", b""))).frames == 1
    zero = _png_chunk(b"acTL", struct.pack(">II", 0, 0))
    assert probe(_png(5, 6, zero, _png_chunk(b"IDAT", b""))).frames == 1
    exif = _png_chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x08\x00\x00")
    header = probe(_png(5, 6, exif, _png_chunk(b"IDAT", b"")))
    assert header.orientation == 8
    assert header.display_size == (6, 5)


def test_png_many_tiny_chunks_hit_the_walk_limit() -> None:
    chunks = _png_chunk(b"tEXt", b"") * (WALK_LIMITS["PNG"] + 10)
    start = time.perf_counter()
    with pytest.raises(ProbeError, match="too many blocks"):
        probe(_png(5, 5, chunks))
    assert time.perf_counter() - start < 0.5


def test_jpeg_zero_width() -> None:
    with pytest.raises(ProbeError, match="zero dimension"):
        probe(b"\xff\xd8" + _jpeg_sof(0, 10))


def test_jpeg_dnl_height_rejected() -> None:
    with pytest.raises(ProbeError, match="DNL"):
        probe(b"\xff\xd8" + _jpeg_sof(10, 0))


def test_jpeg_handcrafted_segments() -> None:
    # Fill bytes, junk and stuffed bytes before markers are skipped; SOF2 and SOF15 count.
    data = b"\xff\xd8\xff\xff\xff\xe0\x00\x04ab\x00\x00\xff\x00\xff\xfe\x00\x02" + _jpeg_sof(640, 480)
    assert probe(data + _JPEG_SOS) == ImageHeader("JPEG", 640, 480, "RGB", 1, 1)
    sof2 = b"\xff\xd8" + b"\xff\xc2" + _jpeg_sof(3, 4, 4)[2:]
    assert probe(sof2 + _JPEG_SOS) == ImageHeader("JPEG", 3, 4, "CMYK", 1, 1)
    # DHT (C4) shares the SOF range but is a table, not a frame header, before or after it.
    dht = b"\xff\xc4\x00\x08" + b"\x00" * 6
    assert probe(b"\xff\xd8" + dht + _jpeg_sof(5, 6, 1) + dht + _JPEG_SOS).mode == "L"
    with pytest.raises(ProbeError, match="component count"):
        probe(b"\xff\xd8" + _jpeg_sof(5, 6, 2))


def test_jpeg_bad_segment_lengths() -> None:
    with pytest.raises(ProbeError, match="segment length"):
        probe(b"\xff\xd8\xff\xe0\x00\x01" + b"\x00" * 20)
    with pytest.raises(ProbeError, match="frame header"):
        probe(b"\xff\xd8\xff\xc0\x00\x05" + b"\x00" * 20)
    # A length pointing past the end asks for more (the frame header is beyond it).
    with pytest.raises(NeedMoreData) as info:
        probe(b"\xff\xd8\xff\xe2\xff\xff" + b"\x00" * 100)
    assert info.value.need is not None and info.value.need > 0xFFFF


def test_jpeg_scan_or_end_before_frame() -> None:
    with pytest.raises(ProbeError, match="scan starts before"):
        probe(b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 10)
    with pytest.raises(ProbeError, match="ends before"):
        probe(b"\xff\xd8\xff\xd9")


def test_jpeg_bad_exif_is_ignored() -> None:
    for payload in (b"Exif\x00\x00", b"Exif\x00\x00XX*\x00", b"Exif\x00\x00II*\x00\xff\xff\xff\xff" + b"\x00" * 8):
        app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
        assert probe(b"\xff\xd8" + app1 + _jpeg_sof(4, 3) + _JPEG_SOS).orientation == 1
    # Orientation out of range falls back to 1; a LONG-typed orientation is tolerated.
    for typ, fmt, value, expected in ((3, "<H2x", 9, 1), (4, "<I", 5, 5)):
        tiff = b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHI", 0x0112, typ, 1) + struct.pack(fmt, value)
        payload = b"Exif\x00\x00" + tiff
        app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
        assert probe(b"\xff\xd8" + app1 + _jpeg_sof(4, 3) + _JPEG_SOS).orientation == expected


def test_jpeg_stuffed_byte_flood_hits_the_walk_limit() -> None:
    start = time.perf_counter()
    with pytest.raises(ProbeError, match="too many blocks"):
        probe(b"\xff\xd8" + b"\xff\x00" * 1_000_000)
    assert time.perf_counter() - start < 0.5


def test_gif_zero_width() -> None:
    with pytest.raises(ProbeError, match="zero dimension"):
        probe(_gif_header(0, 10) + _gif_image(0, 0, 1, 1) + b";")


def test_gif_size_is_frame_zeros_canvas() -> None:
    # Frame 0 overflowing the logical screen grows the canvas; a later frame does not, because
    # PIL's open and a decode of frame 0 never visit it.
    data = _gif_header(2, 2) + _gif_image(0, 0, 2, 2) + _gif_image(10, 0, 60_000, 3) + b";"
    assert probe(data) == ImageHeader("GIF", 2, 2, "P", 2, 1)
    data = _gif_header(2, 2) + _gif_image(10, 0, 60_000, 3) + _gif_image(0, 0, 2, 2) + b";"
    assert probe(data) == ImageHeader("GIF", 60_010, 3, "P", 2, 1)


def _gif_descriptors(data: bytes) -> list[int]:
    """Offsets of the image descriptors of a well-formed GIF."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    found = []
    while data[pos] != 0x3B:
        if data[pos] == 0x2C:
            found.append(pos)
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
        else:
            pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return found


@pytest.mark.parametrize("frame", [0, 1])
def test_gif_overflowing_frame_agrees_with_pil_decode(frame: int) -> None:
    frames = [Image.new("RGB", (10, 8), (255, 0, 0)), Image.new("RGB", (10, 8), (0, 255, 0))]
    data = bytearray(_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], disposal=2))
    struct.pack_into("<HH", data, _gif_descriptors(bytes(data))[frame] + 1, 30, 20)  # move it to (30, 20)
    with Image.open(io.BytesIO(bytes(data))) as im:
        im.load()  # frame 0, what every decoder here uses
        decoded = im.size
    header = probe(bytes(data))
    assert (header.width, header.height) == decoded == ((40, 28) if frame == 0 else (10, 8))


def test_gif_no_frames() -> None:
    with pytest.raises(ProbeError, match="no frames"):
        probe(_gif_header(2, 2) + b";")


def test_gif_ending_before_frame_zero_needs_more() -> None:
    # Frame 0 may still grow the canvas: no answer yet, but `header` says what was read.
    data = b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0x87, 0, 0) + b"\x00" * 30
    with pytest.raises(NeedMoreData) as info:
        probe(data)
    assert info.value.header == ImageHeader("GIF", 4, 4, "P", None, 1)
    assert info.value.need == 13 + 768 + 1


def test_gif_one_byte_sub_blocks_hit_the_walk_limit() -> None:
    body = b"\x2c" + struct.pack("<HHHHB", 0, 0, 2, 2, 0) + b"\x02" + b"\x01\x00" * (WALK_LIMITS["GIF"] + 1)
    start = time.perf_counter()
    with pytest.raises(ProbeError, match="too many blocks"):
        probe(_gif_header(2, 2) + body + b"\x00;")
    assert time.perf_counter() - start < 0.5


def _riff(*chunks: bytes, size: int | None = None) -> bytes:
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if size is None else size) + body


def _webp_chunk(fourcc: bytes, data: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) & 1)


def _vp8x(flags: int, width: int, height: int) -> bytes:
    dims = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return _webp_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + dims)


def test_webp_vp8x_handcrafted() -> None:
    anim = _riff(_vp8x(0x12, 2**24, 300), _webp_chunk(b"ANIM", b"\x00" * 6), *[_webp_chunk(b"ANMF", b"x")] * 3)
    assert probe(anim) == ImageHeader("WEBP", 2**24, 300, "RGBA", 3, 1)
    # Cut inside the walk: size is known, frames are not.
    assert probe(anim[:40]).frames is None
    with pytest.raises(ProbeError, match="no frames"):
        probe(_riff(_vp8x(0x02, 5, 5)))
    # A RIFF size pointing far past the data leaves the walk unfinished.
    assert probe(_riff(_vp8x(0x02, 5, 5), _webp_chunk(b"ANMF", b""), size=2**32 - 1)).frames is None
    overflow = _riff(_vp8x(0x02, 5, 5), b"ANMF\xff\xff\xff\xff")
    with pytest.raises(ProbeError, match="chunk size"):
        probe(overflow)


def test_webp_bad_chunks() -> None:
    with pytest.raises(ProbeError, match="VP8 frame header"):
        probe(_riff(_webp_chunk(b"VP8 ", b"\x00" * 10)))
    with pytest.raises(ProbeError, match="VP8L"):
        probe(_riff(_webp_chunk(b"VP8L", b"\x00" * 5)))
    with pytest.raises(ProbeError, match="zero dimension"):
        probe(_riff(_webp_chunk(b"VP8 ", b"\x00\x00\x00\x9d\x01\x2a\x00\x00\x05\x00")))
    with pytest.raises(ProbeError, match="unsupported WebP chunk"):
        probe(_riff(_webp_chunk(b"ALPH", b"\x00" * 10)))


def test_bmp_handcrafted() -> None:
    def bmp(hsize: int, fields: bytes) -> bytes:
        header = struct.pack("<I", hsize) + fields
        return b"BM" + struct.pack("<IHHI", 14 + len(header), 0, 0, 14 + len(header)) + header

    info = struct.pack("<iiHHIIiiII", 9, -4, 1, 24, 0, 0, 0, 0, 0, 0)
    assert probe(bmp(40, info)) == ImageHeader("BMP", 9, 4, "RGB", 1, 1)
    core = struct.pack("<HHHH", 3, 2, 1, 24)
    assert probe(bmp(12, core)) == ImageHeader("BMP", 3, 2, "RGB", 1, 1)
    with pytest.raises(ProbeError, match="header size"):
        probe(bmp(41, info + b"\x00"))
    with pytest.raises(ProbeError, match="zero dimension"):
        probe(bmp(40, struct.pack("<iiHHIIiiII", 0, 4, 1, 24, 0, 0, 0, 0, 0, 0)))
    with pytest.raises(ProbeError, match="bit depth"):
        probe(bmp(40, struct.pack("<iiHHIIiiII", 2, 4, 1, 7, 0, 0, 0, 0, 0, 0)))
    with pytest.raises(ProbeError, match="compression"):
        probe(bmp(40, struct.pack("<iiHHIIiiII", 2, 4, 1, 24, 4, 0, 0, 0, 0, 0)))
    # 32-bit BITFIELDS with an alpha mask in a v5 header is RGBA, as PIL decodes it.
    v5 = struct.pack("<iiHHIIiiII", 2, 2, 1, 32, 3, 0, 0, 0, 0, 0)
    v5 += struct.pack("<4I", 0xFF0000, 0xFF00, 0xFF, 0xFF000000) + b"\x00" * (124 - 4 - 40 - 16)
    assert probe(bmp(124, v5)).mode == "RGBA"


def test_tiff_handcrafted() -> None:
    def tiff(entries: list[tuple[int, int, int, int]], next_ifd: int = 0, order: str = "<") -> bytes:
        sig = b"II*\x00" if order == "<" else b"MM\x00*"
        ifd = struct.pack(order + "H", len(entries))
        for tag, typ, count, value in entries:
            packed = struct.pack(order + "H2x", value) if typ == 3 else struct.pack(order + "I", value)
            ifd += struct.pack(order + "HHI", tag, typ, count) + packed
        return sig + struct.pack(order + "I", 8) + ifd + struct.pack(order + "I", next_ifd)

    base = [(256, 4, 1, 70_000), (257, 3, 1, 3), (262, 3, 1, 2), (277, 3, 1, 3), (274, 3, 1, 7)]
    assert probe(tiff(base, order=">")) == ImageHeader("TIFF", 70_000, 3, "RGB", 1, 7)
    with pytest.raises(ProbeError, match="width/height"):
        probe(tiff(base[1:]))
    with pytest.raises(ProbeError, match="zero dimension"):
        probe(tiff([(256, 3, 1, 0), *base[1:]]))
    with pytest.raises(ProbeError, match="loops"):
        probe(tiff(base, next_ifd=8))
    # Next IFD beyond the bytes given: a partial result.
    assert probe(tiff(base, next_ifd=10_000)).frames is None
    with pytest.raises(NeedMoreData) as info:
        probe(b"II*\x00\x00\x10\x00\x00")
    assert info.value.need == 0x1000 + 2


# --------------------------------------------------------------------------- headers PIL reads past


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _opened(data: bytes, load: bool = False) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        if load:
            im.load()
        return im.size


def _jpeg_with_second_sof(between: bytes = b"") -> bytes:
    """A real 64x48 JPEG with a 640x480 frame header inserted after its own, before the scan."""
    real = _encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    sof_at = real.index(b"\xff\xc0")
    sof_end = sof_at + 2 + struct.unpack_from(">H", real, sof_at + 2)[0]
    return real[:sof_end] + between + _jpeg_sof(640, 480) + real[sof_end:]


@pytest.mark.parametrize("between", [b"", b"\xff\xd9"], ids=["adjacent", "behind an EOI"])
def test_jpeg_second_frame_header_before_the_scan_is_refused(between: bytes) -> None:
    data = _jpeg_with_second_sof(between)
    # The disagreement this prevents: pricing the first frame header while PIL's open reports the
    # last (it reads on past an EOI, too) and libjpeg refuses the file on load.
    assert _opened(data) == (640, 480)
    with pytest.raises(OSError, match="broken data stream"):
        _opened(data, load=True)
    with pytest.raises(ProbeError) as info:
        probe(data)
    assert str(info.value) == "JPEG has more than one frame header before its scan"
    with pytest.raises(SourceError, match=r"^JPEG has more than one frame header before its scan$"):
        header_prefix(_b64(data))


def test_header_prefix_finds_a_second_frame_header_far_behind_the_first() -> None:
    # A first prefix (3 KiB) ending between the two must not be taken for the answer.
    data = b"\xff\xd8" + _jpeg_sof(4, 3) + _jpeg_app(0xE2, bytes(60_000)) + _jpeg_sof(4000, 3000) + _JPEG_SOS
    with pytest.raises(NeedMoreData) as info:
        probe(data[:3072])
    assert info.value.header == ImageHeader("JPEG", 4, 3, "RGB", None, 1)  # what a whole file would say
    with pytest.raises(SourceError, match="more than one frame header"):
        header_prefix(_b64(data))


def test_jpeg_exif_after_the_frame_header_counts() -> None:
    # PIL reads APP1 anywhere before the scan; so does the probe now that it reads up to the scan.
    exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHIH2x", 0x0112, 3, 1, 6)
    data = b"\xff\xd8" + _jpeg_sof(4, 3) + _jpeg_app(0xE1, exif) + _JPEG_SOS
    assert probe(data).orientation == 6


def _png_with_second_ihdr(between: bytes = b"") -> bytes:
    """A real 8x6 PNG with a second IHDR (16x12) and image data of that size behind its own."""
    real = _encode(Image.new("RGB", (8, 6), (1, 2, 3)), "PNG")
    rows = b"".join(b"\x00" + b"\x05" * 48 for _ in range(12))
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 12, 8, 2, 0, 0, 0))
    return real[:33] + between + ihdr + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("between", [b"", _png_chunk(b"tEXt", b"k\x00" + bytes(60_000))], ids=["adjacent", "far"])
def test_png_second_ihdr_is_refused(between: bytes) -> None:
    data = _png_with_second_ihdr(between)
    assert _opened(data, load=True) == (16, 12)  # PIL decodes the last IHDR's size, not the first's
    with pytest.raises(ProbeError) as info:
        probe(data)
    assert str(info.value) == "PNG has more than one IHDR chunk"
    with pytest.raises(SourceError, match=r"^PNG has more than one IHDR chunk$"):
        header_prefix(_b64(data))


def test_header_prefix_reads_up_to_gif_frame_zero() -> None:
    # The logical screen says 2x2, frame 0 (behind a comment longer than the first prefix) is
    # 3000x2000: PIL decodes into a 3000x2000 canvas, and that is the price.
    comment = b"\x21\xfe" + (b"\xff" + bytes(255)) * 40 + b"\x00"
    data = _gif_header(2, 2) + comment + _gif_image(0, 0, 3000, 2000) + b";"
    assert _opened(data) == (3000, 2000)
    header = header_prefix(_b64(data))
    assert (header.width, header.height, header.frames) == (3000, 2000, None)  # frames are not counted there
    assert probe(data) == ImageHeader("GIF", 3000, 2000, "P", 1, 1)


def test_header_prefix_of_a_whole_payload_that_ends_early_says_what_it_read() -> None:
    # Nothing follows that could change the size, so the price stands; decoders refuse the bytes.
    data = b"\xff\xd8" + _jpeg_sof(5000, 4000) + b"\xff\xd9"
    assert header_prefix(_b64(data)) == ImageHeader("JPEG", 5000, 4000, "RGB", None, 1)
    with pytest.raises(SourceError, match="truncated image: truncated JPEG header"):
        header_prefix(_b64(b"\xff\xd8\xff\xe0\x00\x10JFIF"))


# --------------------------------------------------------------------------- where a header may end


def _app_padding(total: int) -> bytes:
    """APP3 segments of exactly `total` bytes in all (0, or at least 4)."""
    out = []
    while total:
        seg = min(total, 0xFFFF + 2)
        if 0 < total - seg < 4:
            seg -= 4
        out.append(_jpeg_app(0xE3, bytes(seg - 4)))
        total -= seg
    return b"".join(out)


def _jpeg_with_scan_at(offset: int) -> bytes:
    """A real 64x48 JPEG whose start of scan is at `offset`, behind APP segments."""
    real = _encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    data = real[:2] + _app_padding(offset - real.index(b"\xff\xda")) + real[2:]
    assert data.index(b"\xff\xda") == offset
    return data


def test_the_header_must_end_by_the_limit() -> None:
    data = _jpeg_with_scan_at(10_000)
    # The scan's marker and length are the last header bytes the probe reads.
    assert probe(data, max_header_bytes=10_004) == ImageHeader("JPEG", 64, 48, "RGB", 1, 1)
    with pytest.raises(ProbeError) as info:
        probe(data, max_header_bytes=10_003)
    assert not isinstance(info.value, NeedMoreData)  # more bytes cannot help
    assert str(info.value) == "no image header in the first 10003 bytes (limits.max_header_bytes)"
    # Bytes that end before the limit are only short, not refused.
    with pytest.raises(NeedMoreData):
        probe(data[:9000], max_header_bytes=10_003)
    assert header_prefix(_b64(data), max_bytes=10_004).width == 64
    with pytest.raises(SourceError, match=r"^no image header in the first 10003 bytes \(limits\.max_header_bytes\)$"):
        header_prefix(_b64(data), max_bytes=10_003)
    with pytest.raises(ValueError, match="positive"):
        probe(data, max_header_bytes=0)


def test_a_frame_header_behind_19_mib_of_app_segments_is_refused_without_decoding_it_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _jpeg_with_scan_at(19 << 20)
    text = _b64(data)
    decoded: list[int] = []
    real = binascii.a2b_base64

    def counting(chunk: str, *, strict_mode: bool = False) -> bytes:
        decoded.append(len(chunk))
        return real(chunk, strict_mode=strict_mode)

    monkeypatch.setattr(sources.binascii, "a2b_base64", counting)
    probes: list[int] = []
    real_probe = sources.probe

    def counting_probe(buf: bytes, **kwargs: Any) -> Any:
        probes.append(len(buf))
        return real_probe(buf, **kwargs)

    monkeypatch.setattr(sources, "probe", counting_probe)
    message = f"no image header in the first {DEFAULT_MAX_HEADER_BYTES} bytes (limits.max_header_bytes)"
    with pytest.raises(SourceError) as info:
        header_prefix(text)
    assert str(info.value) == message
    # What was decoded on the way: one byte past the limit's worth of base64, not 26 MB of it.
    assert sum(decoded) == 4 * (DEFAULT_MAX_HEADER_BYTES // 3 + 1) and len(text) > 25_000_000
    assert len(probes) <= 3  # rounds, each probing the prefix again: 3 KiB, 48 KiB, the limit
    assert max(decoded) <= 1 << 16  # decoded in pieces: a thread probing it hands the GIL back between them
    with pytest.raises(ProbeError) as probe_info:
        probe(data)  # a caller with the whole payload (a fetched URL) gets the same answer
    assert str(probe_info.value) == message


def test_the_limit_bounds_every_format_where_its_header_can_be_pushed_back() -> None:
    limit = 4096
    cases = {
        "PNG: chunks before IDAT": _png(5, 6, _png_chunk(b"tEXt", bytes(5000)), _png_chunk(b"IDAT", b"")),
        "GIF: extensions before frame 0": _gif_header(2, 2)
        + b"\x21\xfe"
        + (b"\xff" + bytes(255)) * 20
        + b"\x00"
        + _gif_image(0, 0, 2, 2)
        + b";",
        "TIFF: an IFD placed late": b"II*\x00"
        + struct.pack("<I", 6000)
        + bytes(5992)
        + struct.pack("<H", 2)
        + struct.pack("<HHII", 256, 4, 1, 9)
        + struct.pack("<HHII", 257, 4, 1, 7)
        + bytes(4),
    }
    for what, data in cases.items():
        assert probe(data).width in (2, 5, 9), what
        with pytest.raises(ProbeError, match=r"no image header in the first 4096 bytes"):
            probe(data, max_header_bytes=limit)


def test_frames_past_the_limit_are_still_counted() -> None:
    # The limit bounds where the header may end, not the frame count walked after it.
    gif = _gif_header(2, 2) + (_gif_image(0, 0, 2, 2) + b"\x21\xfe" + (b"\xff" + bytes(255)) * 8 + b"\x00") * 5 + b";"
    assert probe(gif, max_header_bytes=64).frames == 5
    tiff = _encode(_rgb(), "TIFF", save_all=True, append_images=_frames(2))
    smallest = next(limit for limit in range(8, len(tiff)) if _fits(tiff, limit))
    ifds, at = [], struct.unpack_from("<I", tiff, 4)[0]
    while at:
        ifds.append(at)
        at = struct.unpack_from("<I", tiff, at + 2 + 12 * struct.unpack_from("<H", tiff, at)[0])[0]
    assert len(ifds) == 3 and smallest < ifds[-1]  # the last page's IFD lies past the limit
    assert probe(tiff, max_header_bytes=smallest).frames == 3
    assert probe(tiff, count_frames=False).frames is None
    assert probe(gif, count_frames=False).frames is None


def _fits(data: bytes, limit: int) -> bool:
    try:
        probe(data, max_header_bytes=limit)
    except ProbeError:
        return False
    return True


@pytest.mark.parametrize("name", ["jpeg-exif-6", "png-exif-6", "apng-3", "gif-animated-5", "webp-exif-6", "bmp-p"])
def test_every_limit_refuses_or_agrees(name: str, samples: dict[str, bytes]) -> None:
    data = samples[name]
    full = probe(data)
    refused = 0
    for limit in range(1, len(data) + 2):
        try:
            header = probe(data, max_header_bytes=limit)
        except ProbeError as exc:
            assert str(exc) == f"no image header in the first {limit} bytes (limits.max_header_bytes)", limit
            refused += 1
            continue
        assert header == full, limit
    assert refused > 0


def test_tiff_with_a_huge_ifd_hits_the_walk_limit() -> None:
    count = WALK_LIMITS["TIFF"] + 1
    ifd = struct.pack("<H", count) + struct.pack("<HHII", 256, 4, 1, 9) * count + bytes(4)
    start = time.perf_counter()
    with pytest.raises(ProbeError, match="too many blocks"):
        probe(b"II*\x00" + struct.pack("<I", 8) + ifd)
    assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image data"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG images are not supported"),
        (b'<?xml version="1.0"?><svg/>', "SVG images are not supported"),
        (b"\xef\xbb\xbf \n\t<svg></svg>", "SVG images are not supported"),
        (b"<!DOCTYPE svg PUBLIC><svg/>", "SVG images are not supported"),
        (b"<!-- made by hand --><svg/>", "SVG images are not supported"),
        (b"%PDF-1.7\n%\xe2\xe3", "unsupported image format (starts with b'%PDF-1.7')"),
        (b"<!DOCTYPE html><html><svg/></html>", "unsupported image format (starts with b'<!DOCTYP')"),
        (b"<html><body>", "unsupported image format (starts with b'<html><b')"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "unsupported image format (starts with b'RIFF\\x00\\x00\\x00\\x00')"),
        (b"\x00\x00\x00\x1cftypavif", "unsupported image format (starts with b'\\x00\\x00\\x00\\x1cftyp')"),
    ],
)
def test_rejections(data: bytes, message: str) -> None:
    with pytest.raises(ProbeError) as info:
        probe(data)
    assert not isinstance(info.value, NeedMoreData)
    assert str(info.value) == message


def test_random_bytes_rejected() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(64))
        if sniff_format(data) is not None:
            continue
        with pytest.raises(ProbeError, match=r"unsupported image format \(starts with"):
            probe(data)


def test_sniff_format() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WEBP"
    assert sniff_format(b"MM\x00*") == "TIFF"
    assert sniff_format(b"<svg") is None
    assert sniff_format(b"") is None


# --------------------------------------------------------------------------- fuzzing

_MAGIC_PREFIXES = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"GIF89a",
    b"RIFF\xff\xff\xff\x00WEBPVP8X",
    b"RIFF\xff\xff\xff\x00WEBPVP8L",
    b"RIFF\xff\xff\xff\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
]
_FUZZ_SETTINGS = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check_probe(data: bytes, limit: int = DEFAULT_MAX_HEADER_BYTES) -> None:
    start = time.perf_counter()
    try:
        header = probe(data, max_header_bytes=limit)
    except ProbeError as exc:
        # The catch-all for struct/index errors is a safety net; no input should reach it.
        assert exc.__cause__ is None, repr(exc.__cause__)
    else:
        assert isinstance(header, ImageHeader)
        assert header.width > 0 and header.height > 0
        assert 1 <= header.orientation <= 8
        assert header.frames is None or header.frames >= 1
    assert time.perf_counter() - start < 0.25


@_FUZZ_SETTINGS
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check_probe(data)


@_FUZZ_SETTINGS
@given(st.sampled_from(_MAGIC_PREFIXES), st.binary(max_size=512))
def test_fuzz_behind_magic(magic: bytes, tail: bytes) -> None:
    _check_probe(magic + tail)


_MUTATION_BASES = [
    "jpeg-exif-6",
    "jpeg-cmyk",
    "png-exif-6",
    "apng-3",
    "gif-animated-5",
    "webp-animated-4",
    "webp-exif-6",
    "bmp-p",
    "tiff-3-pages",
]


@_FUZZ_SETTINGS
@given(
    name=st.sampled_from(_MUTATION_BASES),
    edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.integers(0, 4096)),
    limit=st.one_of(st.just(DEFAULT_MAX_HEADER_BYTES), st.integers(1, 4096)),
)
def test_fuzz_mutated_headers(
    name: str, edits: list[tuple[int, int]], cut: int | None, limit: int, samples: dict[str, bytes]
) -> None:
    data = bytearray(samples[name])
    for offset, value in edits:
        # Concentrate mutations on the first bytes, where the headers live.
        data[offset % min(len(data), 512)] = value
    _check_probe(bytes(data if cut is None else data[:cut]), limit)
