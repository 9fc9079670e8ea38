"""Tests for preprocess/processors.py and preprocess/cost.py.

Three claims are checked against the real transformers processors, offline:
* every preset loads and runs, and ``read_spec`` reads the numbers the loaded processor uses;
* ``output_shapes`` equals the processor's output shapes and dtypes, and refuses exactly the
  sizes the processor refuses (hundreds of seeded sizes per Qwen preset, edge cases included);
* parity: ``run_processor(p, decode(bytes))`` is bit-identical to calling the processor on a
  reference decode written here, independently, from the policy in processors.py's docstring, and
  to what transformers computes from the same bytes (the processor on ``Image.open(bytes)``, and on
  ``load_image`` for images without alpha) wherever the policy does not say otherwise.
Images for the shape tests are solid ``Image.new`` images: cheap to build, same geometry as noise.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Whatever the environment says, nothing here may reach the Hub (load_processor also passes
# local_files_only); set before transformers is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import load_image

from preprocess import processors
from preprocess.cost import CostError, output_nbytes, output_shapes, smart_resize
from preprocess.probe import probe
from preprocess.processors import (
    PRESETS_DIR,
    DecodeError,
    ProcessorError,
    ProcessorSpec,
    available_presets,
    decode,
    load_processor,
    read_spec,
    resolve_processor,
    run_processor,
)

PRESETS = ("llava-1.5", "qwen2-vl", "qwen2.5-vl", "siglip")
QWEN_PRESETS = ("qwen2-vl", "qwen2.5-vl")
FIXED_PRESETS = ("llava-1.5", "siglip")


@pytest.fixture(scope="module")
def loaded() -> dict[str, Any]:
    return {name: load_processor(name) for name in PRESETS}


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return directory


def observed_shapes(processor: Any, width: int, height: int) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """What the processor really emits for a width x height image; None where it raises."""
    try:
        out = run_processor(processor, Image.new("RGB", (width, height), (90, 120, 150)))
    except ValueError:
        return None
    return {name: (array.shape, array.dtype.name) for name, array in out.items()}


def predicted_shapes(spec: ProcessorSpec, width: int, height: int) -> dict[str, tuple[tuple[int, ...], str]] | None:
    try:
        return output_shapes(spec, width, height)
    except CostError:
        return None


def assert_cost_model_matches(processor: Any, spec: ProcessorSpec, sizes: list[tuple[int, int]]) -> None:
    mismatches = []
    for width, height in sizes:
        want, got = observed_shapes(processor, width, height), predicted_shapes(spec, width, height)
        if want != got:
            mismatches.append(f"{width}x{height}: processor {want}, cost model {got}")
    assert not mismatches, f"{len(mismatches)}/{len(sizes)} sizes differ:\n" + "\n".join(mismatches[:20])


# -- presets, resolution, specs ----------------------------------------------------------------------


def test_presets_are_listed() -> None:
    assert available_presets() == PRESETS
    assert PRESETS_DIR.name == "processors"


def test_resolve_processor(tmp_path: Path) -> None:
    assert resolve_processor("qwen2-vl") == PRESETS_DIR / "qwen2-vl"
    custom = write_config(tmp_path / "custom", {"image_processor_type": "SiglipImageProcessor"})
    assert resolve_processor(str(custom)) == custom.resolve()
    for bad in ("no-such-model", str(tmp_path), "../processors/qwen2-vl", ""):
        with pytest.raises(ProcessorError) as info:
            resolve_processor(bad)
        assert all(name in str(info.value) for name in PRESETS)  # the error lists what exists


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_offline_and_runs(loaded: dict[str, Any], preset: str) -> None:
    processor = loaded[preset]
    # The PIL backend is pinned: no torchvision here, and its resize would give other tensors anyway.
    assert type(processor).__name__.endswith("Pil")
    out = run_processor(processor, Image.new("RGB", (64, 48), (10, 200, 30)))
    qwen = preset in QWEN_PRESETS
    assert set(out) == ({"pixel_values", "image_grid_thw"} if qwen else {"pixel_values"})
    for array in out.values():
        assert isinstance(array, np.ndarray)
        assert array.flags.c_contiguous
    assert out["pixel_values"].dtype == np.float32
    if qwen:
        assert out["image_grid_thw"].dtype == np.int64


@pytest.mark.parametrize("preset", PRESETS)
def test_spec_reads_the_numbers_the_processor_uses(loaded: dict[str, Any], preset: str) -> None:
    spec, processor = read_spec(resolve_processor(preset)), loaded[preset]
    if preset in QWEN_PRESETS:
        assert spec.family == "qwen2_vl"
        assert (spec.min_pixels, spec.max_pixels) == (3136, 12845056)
        assert (spec.min_pixels, spec.max_pixels) == (processor.size.shortest_edge, processor.size.longest_edge)
        assert (spec.patch_size, spec.temporal_patch_size, spec.merge_size) == (
            processor.patch_size,
            processor.temporal_patch_size,
            processor.merge_size,
        )
    elif preset == "llava-1.5":
        assert (spec.family, spec.shortest_edge, spec.crop_hw) == ("clip", 336, (336, 336))
    else:
        assert (spec.family, spec.resize_hw, spec.crop_hw) == ("siglip", (384, 384), None)


QWEN_BASE = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2}


@pytest.mark.parametrize(
    ("extra", "bounds"),
    [
        ({}, (3136, 1003520)),  # class defaults
        ({"min_pixels": 1000, "max_pixels": 200000}, (1000, 200000)),
        ({"size": {"shortest_edge": 1234, "longest_edge": 56789}}, (1234, 56789)),
        ({"size": {"shortest_edge": 1234, "longest_edge": 56789}, "max_pixels": 99999}, (1234, 99999)),
        ({"size": {"min_pixels": 1, "max_pixels": 2}, "min_pixels": 2222, "max_pixels": 88888}, (2222, 88888)),
        ({"max_pixels": None}, (3136, 1003520)),
        ({"size": {"min_pixels": 1111, "max_pixels": 77777}}, None),  # the processor raises on every call
        ({"size": {"longest_edge": 56789}}, None),
    ],
)
def test_qwen_spec_follows_transformers_precedence(
    tmp_path: Path, extra: dict[str, Any], bounds: tuple[int, int] | None
) -> None:
    directory = write_config(tmp_path, {**QWEN_BASE, **extra})
    processor = load_processor(str(directory))
    if bounds is None:
        with pytest.raises(ProcessorError):
            read_spec(directory)
        with pytest.raises(ValueError, match="shortest_edge"):
            run_processor(processor, Image.new("RGB", (64, 48)))
        return
    spec = read_spec(directory)
    assert (spec.min_pixels, spec.max_pixels) == bounds == (processor.size.shortest_edge, processor.size.longest_edge)


def test_read_spec_refuses_what_it_cannot_predict(tmp_path: Path) -> None:
    cases: list[dict[str, Any]] = [
        {"image_processor_type": "LlavaNextImageProcessor"},
        {"feature_extractor_type": "CLIPFeatureExtractor"},
        {**QWEN_BASE, "do_resize": False},
        {**QWEN_BASE, "patch_size": 0},
        {"image_processor_type": "CLIPImageProcessor", "do_center_crop": False, "size": {"max_height": 9}},
    ]
    for i, config in enumerate(cases):
        with pytest.raises(ProcessorError):
            read_spec(write_config(tmp_path / str(i), config))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ProcessorError):
        read_spec(tmp_path / "broken")


def test_fast_names_map_to_the_same_family(tmp_path: Path) -> None:
    config = json.loads((PRESETS_DIR / "qwen2-vl" / "preprocessor_config.json").read_text())
    directory = write_config(tmp_path, {**config, "image_processor_type": "Qwen2VLImageProcessorFast"})
    preset = read_spec(PRESETS_DIR / "qwen2-vl")
    assert read_spec(directory) == dataclasses.replace(preset, processor_type="Qwen2VLImageProcessorFast")
    assert type(load_processor(str(directory))).__name__ == "Qwen2VLImageProcessorPil"


def test_only_the_pil_fallback_notice_is_silenced() -> None:
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.utils.import_utils")
    logger.addHandler(handler)
    try:
        with processors._quiet_pil_fallback():
            logger.warning("`Qwen2VLImageProcessor` requires torchvision; falling back to `Qwen2VLImageProcessorPil`")
            logger.warning("something else")
        logger.warning("falling back to `XPil` outside the load")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else", "falling back to `XPil` outside the load"]


# -- cost model: exact shapes -------------------------------------------------------------------------


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return max(low, min(high, round(math.exp(rng.uniform(math.log(low), math.log(high))))))


def qwen_sizes(seed: int) -> list[tuple[int, int]]:
    """Edge cases plus 200 seeded random (width, height) pairs."""
    fixed = [
        # tiny: scaled up to min_pixels (no "too small" error in transformers 5.24)
        (1, 1), (3, 3), (27, 27), (28, 28), (29, 29), (14, 14), (56, 56), (55, 57), (1, 2), (13, 1),
        # round() is round-half-even: 42 = 1.5 x 28 -> 56, 70 = 2.5 x 28 -> 56, 98 = 3.5 x 28 -> 112
        (42, 42), (70, 70), (98, 98), (42, 70), (126, 154),
        # aspect ratio around the 200 limit (exactly 200 passes)
        (1, 200), (200, 1), (1, 201), (201, 1), (2, 400), (2, 401), (401, 2), (1, 199), (28, 5600), (5601, 28),
        # long sides up to 8000
        (8000, 40), (8000, 39), (40, 8000), (39, 8000), (7999, 40), (8000, 41), (8000, 300), (6000, 1000),
        # max_pixels: 3584^2 is exactly 12845056 (kept), 4200x3200 is above (floor branch)
        (3584, 3584), (4200, 3200), (1920, 1080), (1080, 1920),
    ]  # fmt: skip
    rng = random.Random(seed)
    randoms: list[tuple[int, int]] = []
    for _ in range(150):  # ordinary sizes, log-uniform sides: many tiny, some to 2048
        randoms.append((log_uniform(rng, 1, 2048), log_uniform(rng, 1, 2048)))
    for _ in range(30):  # extreme aspect ratios, about half past the limit
        short = rng.randint(1, 40)
        long = min(8000, round(short * rng.uniform(150, 260)))
        randoms.append((long, short) if rng.random() < 0.5 else (short, long))
    for _ in range(20):  # one pixel either side of exactly 200:1
        short = rng.randint(1, 40)
        long = min(8000, 200 * short + rng.choice((-1, 0, 1)))
        randoms.append((long, short) if rng.random() < 0.5 else (short, long))
    return fixed + randoms


@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_cost_model_matches_qwen_preset(loaded: dict[str, Any], preset: str) -> None:
    sizes = qwen_sizes(seed=QWEN_PRESETS.index(preset))
    assert len(sizes) >= 235
    assert_cost_model_matches(loaded[preset], read_spec(resolve_processor(preset)), sizes)


def test_cost_model_matches_qwen_with_tight_bounds(tmp_path: Path) -> None:
    # Bounds vLLM users commonly set (128..256 merged tokens): most random sizes then take the
    # floor (max_pixels) or ceil (min_pixels) branch, cheaply.
    directory = write_config(tmp_path, {**QWEN_BASE, "merge_size": 2, "min_pixels": 100352, "max_pixels": 200704})
    sizes = qwen_sizes(seed=7)[:-4]  # drop the big ones: the branches are what this case is for
    assert_cost_model_matches(load_processor(str(directory)), read_spec(directory), sizes)


def fixed_sizes(seed: int, max_aspect: float) -> list[tuple[int, int]]:
    fixed = [(1, 1), (3, 3), (336, 336), (335, 337), (337, 335), (384, 383), (1920, 1080), (1080, 1920), (7, 3)]
    rng = random.Random(seed)
    randoms: list[tuple[int, int]] = []
    while len(randoms) < 24:
        width, height = log_uniform(rng, 1, 3000), log_uniform(rng, 1, 3000)
        if max(width, height) / min(width, height) <= max_aspect:
            randoms.append((width, height))
    return fixed + randoms


@pytest.mark.parametrize("preset", FIXED_PRESETS)
def test_cost_model_matches_fixed_size_preset(loaded: dict[str, Any], preset: str) -> None:
    sizes = [*fixed_sizes(seed=11, max_aspect=100), (2000, 20), (20, 2000)]
    assert_cost_model_matches(loaded[preset], read_spec(resolve_processor(preset)), sizes)


def test_cost_model_matches_shortest_edge_without_crop(tmp_path: Path) -> None:
    # Output size depends on the aspect ratio here; transformers truncates the long edge.
    config = json.loads((PRESETS_DIR / "llava-1.5" / "preprocessor_config.json").read_text())
    directory = write_config(tmp_path, {**config, "do_center_crop": False, "size": {"shortest_edge": 64}})
    sizes = fixed_sizes(seed=12, max_aspect=20)
    assert_cost_model_matches(load_processor(str(directory)), read_spec(directory), sizes)


def test_cost_model_numbers() -> None:
    spec = read_spec(resolve_processor("qwen2-vl"))
    # 1080p: smart_resize -> 1092x1932, a 78x138 grid of 14-pixel patches
    assert output_shapes(spec, 1920, 1080) == {
        "pixel_values": ((78 * 138, 1176), "float32"),
        "image_grid_thw": ((1, 3), "int64"),
    }
    assert output_nbytes(spec, 1920, 1080) == 78 * 138 * 1176 * 4 + 3 * 8
    # Orientation changes the grid but never the byte count (smart_resize is symmetric).
    assert output_nbytes(spec, 1080, 1920) == output_nbytes(spec, 1920, 1080)
    assert output_nbytes(read_spec(resolve_processor("llava-1.5")), 1, 1) == 3 * 336 * 336 * 4
    assert smart_resize(70, 42, factor=28, min_pixels=3136, max_pixels=10**9) == (56, 56)
    for width, height in ((0, 10), (10, 0), (-1, 5), (1, 201), (8000, 39)):
        with pytest.raises(CostError):
            output_nbytes(spec, width, height)


# -- decode policy and parity ---------------------------------------------------------------------------


def pattern(width: int, height: int) -> np.ndarray:
    """An RGB test card with gradients in x and y, so transposes and flips show."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 7 + y * 13) % 256], axis=-1)
    return rgb.astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def with_orientation(image: Image.Image, orientation: int) -> Image.Exif:
    exif = image.getexif()
    exif[0x0112] = orientation
    return exif


def rgba_card(width: int, height: int) -> Image.Image:
    rgba = np.dstack([pattern(width, height), np.linspace(0, 255, width * height).reshape(height, width)])
    return Image.fromarray(rgba.astype(np.uint8))


def palette_card() -> Image.Image:
    image = Image.fromarray(pattern(32, 24)).quantize(16)
    image.info["transparency"] = 3
    return image


def sixteen_bit_gray(width: int, height: int) -> Image.Image:
    values = (np.arange(width * height, dtype=np.uint32) * 65535 // (width * height - 1)).astype(np.uint16)
    return Image.frombytes("I;16", (width, height), values.reshape(height, width).tobytes())


def animated(fmt: str, colors: list[tuple[int, int, int]], **params: Any) -> bytes:
    frames = [Image.new("RGB", (20, 16), color) for color in colors]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **params)


def build_corpus() -> dict[str, bytes]:
    card = Image.fromarray(pattern(64, 48))
    gray_la = Image.merge("LA", (card.convert("L"), rgba_card(64, 48).getchannel("A")))
    rgb_trns = Image.fromarray(pattern(16, 8))
    return {
        "jpeg-baseline": encode(card, "JPEG", quality=90),
        "jpeg-progressive": encode(card, "JPEG", quality=90, progressive=True),
        "jpeg-cmyk": encode(card.convert("CMYK"), "JPEG", quality=95),
        "jpeg-gray": encode(card.convert("L"), "JPEG"),
        "png-rgb": encode(card, "PNG"),
        "png-rgba": encode(rgba_card(64, 48), "PNG"),
        "png-palette-transparency": encode(palette_card(), "PNG"),
        "png-palette-opaque": encode(card.quantize(8), "PNG"),
        "png-la": encode(gray_la, "PNG"),
        "png-rgb-trns": encode(rgb_trns, "PNG", transparency=tuple(int(v) for v in pattern(16, 8)[0, 0])),
        "png-l": encode(card.convert("L"), "PNG"),
        "png-i16": encode(sixteen_bit_gray(40, 30), "PNG"),
        "png-i16-trns": encode(sixteen_bit_gray(40, 30), "PNG", transparency=4000),
        "tiff-i16": encode(sixteen_bit_gray(40, 30), "TIFF"),
        "png-1bit": encode(card.convert("1"), "PNG"),
        "webp-lossy": encode(card, "WEBP", quality=80),
        "webp-rgba": encode(rgba_card(64, 48), "WEBP", lossless=True),
        "gif-animated": animated("GIF", [(255, 0, 0), (0, 255, 0), (0, 0, 255)]),
        "webp-animated": animated("WEBP", [(200, 10, 10), (10, 200, 10)], lossless=True),
        "tiff-rgb": encode(card, "TIFF"),
        "bmp-rgb": encode(card, "BMP"),
        "png-1x1": encode(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"),
        "jpeg-wide": encode(Image.fromarray(pattern(2000, 20)), "JPEG"),
        "png-tall": encode(Image.fromarray(pattern(20, 2000)), "PNG"),
        "jpeg-exif6": encode(card, "JPEG", exif=with_orientation(card, 6)),
        "png-exif3": encode(card, "PNG", exif=with_orientation(card, 3)),
        "webp-exif8": encode(card, "WEBP", lossless=True, exif=with_orientation(card, 8)),
        "tiff-exif5": encode(card, "TIFF", exif=with_orientation(card, 5)),
        "png-rgba-exif7": encode(rgba_card(64, 48), "PNG", exif=with_orientation(card, 7)),
    }


CORPUS = build_corpus()
ROTATED = {"jpeg-exif6", "png-exif3", "webp-exif8", "tiff-exif5", "png-rgba-exif7"}
SIXTEEN_BIT = {"png-i16", "png-i16-trns", "tiff-i16"}


def reference_decode(data: bytes) -> Image.Image:
    """The documented policy, written from the docstring rather than from decode()."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # frame 0, upright
    # What every PIL-backend processor does with do_convert_rgb: alpha over white, else convert.
    rgb: np.ndarray = convert_to_rgb(image, return_numpy=True)  # type: ignore[assignment]
    return Image.fromarray(rgb)


def assert_bit_identical(got: dict[str, np.ndarray], want: Any) -> None:
    assert set(got) == set(want)
    for name, array in got.items():
        expected = np.asarray(want[name])
        assert (array.dtype, array.shape) == (expected.dtype, expected.shape), name
        assert array.tobytes() == expected.tobytes(), name


@pytest.fixture(scope="module")
def decoded() -> dict[str, Image.Image]:
    return {name: decode(data) for name, data in CORPUS.items()}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_decode_matches_reference_policy(decoded: dict[str, Image.Image], name: str) -> None:
    image = decoded[name]
    assert image.mode == "RGB"
    assert "transparency" not in image.info
    assert np.array_equal(np.asarray(image), np.asarray(reference_decode(CORPUS[name])))
    # The cost model is fed the probed display size: it must be the decoded size.
    assert probe(CORPUS[name]).display_size == image.size


@pytest.mark.parametrize("preset", PRESETS)
def test_parity_with_processor_on_reference_decode(
    loaded: dict[str, Any], decoded: dict[str, Image.Image], preset: str
) -> None:
    processor, spec = loaded[preset], read_spec(resolve_processor(preset))
    for name, data in CORPUS.items():
        got = run_processor(processor, decoded[name])
        assert_bit_identical(got, processor(images=reference_decode(data), return_tensors="np"))
        assert output_nbytes(spec, *decoded[name].size) == sum(a.nbytes for a in got.values()), name
        if name not in ROTATED:
            # A client that skips our decode and hands the processor Image.open(bytes) gets the
            # same tensors: the alpha policy is the processor's own.
            direct = processor(images=Image.open(io.BytesIO(data)), return_tensors="np")
            assert_bit_identical(got, direct)
        if name in SIXTEEN_BIT:
            # And so does one that loads the image as transformers' pipelines do (load_image:
            # upright, convert("RGB")): 16-bit gray is PIL's conversion, not a policy of ours.
            loaded_image = load_image(Image.open(io.BytesIO(data)))
            assert_bit_identical(got, processor(images=loaded_image, return_tensors="np"))


def test_exif_orientation_is_applied(loaded: dict[str, Any]) -> None:
    card = np.zeros((30, 40, 3), np.uint8)
    card[:, :5] = (255, 0, 0)  # a red bar along the stored image's left edge
    image = Image.fromarray(card)
    # Where the left edge ends up on screen for each orientation (EXIF spec / what viewers show).
    edge_after: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        1: lambda a: a[:, 0],
        3: lambda a: a[:, -1],
        6: lambda a: a[0, :],
        8: lambda a: a[-1, :],
    }
    for orientation, edge in edge_after.items():
        for fmt in ("JPEG", "PNG"):
            out = np.asarray(decode(encode(image, fmt, quality=95, exif=with_orientation(image, orientation))))
            assert out.shape[:2] == ((40, 30) if orientation in (6, 8) else (30, 40))
            assert (edge(out)[:, 0] > 200).all() and (edge(out)[:, 1] < 60).all(), (orientation, fmt)
    # The documented difference: the processor on Image.open(bytes) sees the stored, sideways pixels.
    data = encode(image, "JPEG", exif=with_orientation(image, 6))
    qwen = loaded["qwen2-vl"]
    ours = run_processor(qwen, decode(data))["image_grid_thw"]
    theirs = qwen(images=Image.open(io.BytesIO(data)), return_tensors="np")["image_grid_thw"]
    assert ours.tolist() == [[1, 6, 4]] and theirs.tolist() == [[1, 4, 6]]  # 30 wide x 40 tall, vs 40 x 30


def test_alpha_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128), (200, 100, 0, 0)])
    assert np.asarray(decode(encode(rgba, "PNG"))).tolist() == [
        [[255, 255, 255], [10, 20, 30], [127, 127, 127], [255, 255, 255]]
    ]
    palette = palette_card()
    out, indices = np.asarray(decode(encode(palette, "PNG"))), np.asarray(palette)
    assert (out[indices == 3] == 255).all() and (out[indices != 3] != 255).any(axis=-1).any()
    # GIF transparency (a palette index) follows the same rule.
    gif = Image.new("P", (2, 1))
    gif.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    gif.putdata([0, 1])
    assert np.asarray(decode(encode(gif, "GIF", transparency=0))).tolist() == [[[255, 255, 255], [9, 9, 9]]]


def test_sixteen_bit_gray_is_what_transformers_gets_from_pil() -> None:
    # Parity over looks: PIL clips 16-bit gray at 255 (a real 16-bit photo comes out nearly white),
    # transformers feeds the processor exactly that, and so do we. A transparent value is ignored
    # by PIL's 16-bit conversions, so it changes nothing either.
    values = np.array([[0, 255, 256, 4000, 32768, 65535]], dtype=np.uint16)
    clipped = [0, 255, 255, 255, 255, 255]
    for params in ({}, {"transparency": 4000}):
        data = encode(Image.frombytes("I;16", (6, 1), values.tobytes()), "PNG", **params)
        ours = np.asarray(decode(data))
        assert ours[0, :, 0].tolist() == clipped, params
        assert np.array_equal(ours, np.asarray(load_image(Image.open(io.BytesIO(data)))))
        assert np.array_equal(ours, convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True))


def test_first_frame_only() -> None:
    assert decode(CORPUS["gif-animated"]).getpixel((5, 5)) == (255, 0, 0)
    assert decode(CORPUS["webp-animated"]).getpixel((5, 5)) == (200, 10, 10)


def bad_inputs() -> Iterator[tuple[str, bytes]]:
    jpeg = CORPUS["jpeg-baseline"]
    yield "empty", b""
    yield "garbage", b"\x00not an image at all" * 10
    yield "truncated jpeg", jpeg[: len(jpeg) // 2]
    yield "truncated png", CORPUS["png-rgb"][:60]
    yield "format the probe does not read (PPM)", encode(Image.new("RGB", (4, 4)), "PPM")
    yield "ICO", encode(Image.new("RGB", (16, 16)), "ICO")


@pytest.mark.parametrize(("what", "data"), list(bad_inputs()), ids=[what for what, _ in bad_inputs()])
def test_decode_refuses_bad_bytes(what: str, data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)
