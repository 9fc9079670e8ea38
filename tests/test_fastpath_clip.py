"""Tests for preprocess/fastpath_clip.py and its use by the workers: bit parity with transformers, or transformers.

* parity: ``ClipFastPath.run(decode(bytes))`` equals ``run_processor(load_processor(preset), decode(bytes))``
  bit for bit (values, dtype, shape) for llava-1.5 (CLIP: shortest edge, center crop) and siglip
  (fixed size), over JPEG and PNG images from 1x1 to 1080p, upscaled, kept, downscaled, very wide
  and very tall; and the cost model predicts exactly what it writes;
* coverage: the processors and settings it does not cover are refused with a reason, and
  ``fast_path_for`` picks the right class for every shipped preset; a processor that differs where
  the fast path cannot see it fails the proof at load;
* the worker: fast path on and off write the same bytes into the arena.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from preprocess.arena import Arena, segment_name
from preprocess.cost import output_nbytes, output_shapes
from preprocess.extents import reservation_size
from preprocess.fastpath import NotCovered, Qwen2VLFastPath, SelfCheckFailed
from preprocess.fastpath_clip import ClipFastPath
from preprocess.processors import (
    available_presets,
    decode,
    load_processor,
    read_spec,
    resolve_processor,
    run_processor,
)
from preprocess.protocol import TensorDescriptor
from preprocess.worker import ImageTask, WorkerSetup, fast_path_for, process_image

from .test_fastpath import encode, photo, preset_config

PRESETS = ("llava-1.5", "siglip")
QWEN_PRESETS = ("qwen2-vl", "qwen2.5-vl")


def corpus() -> Iterator[tuple[str, bytes]]:
    """(name, encoded bytes): the sizes and modes the parity claim must hold for."""
    jpeg = [
        (1, 1),
        (2, 3),
        (100, 80),  # smaller than both targets: upscaled
        (336, 336),  # llava-1.5's target: no resize, no crop
        (384, 384),  # siglip's target: no resize
        (500, 336),  # short edge 336: llava keeps the size and only crops (an odd offset)
        (333, 517),  # odd sizes
        (97, 61),
        (2000, 20),  # very wide: llava resizes to 33600x336 before the crop
        (20, 2000),  # very tall
        (1920, 1080),
    ]
    for width, height in jpeg:
        yield f"jpeg-{width}x{height}", encode(photo(width, height, seed=width), "JPEG", quality=90)
    rng = np.random.default_rng(3)
    yield "png-2x3", encode(Image.fromarray(rng.integers(0, 256, (3, 2, 3), dtype=np.uint8)), "PNG")
    yield "png-385x383", encode(Image.fromarray(rng.integers(0, 256, (383, 385, 3), dtype=np.uint8)), "PNG")
    yield "png-rgba", encode(Image.fromarray(rng.integers(0, 256, (150, 211, 4), dtype=np.uint8)), "PNG")
    yield "png-gray", encode(photo(300, 200).convert("L"), "PNG")
    palette = photo(257, 190).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    yield "png-palette-transparent", encode(palette, "PNG", transparency=5)


def assert_identical(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], what: str) -> None:
    assert list(got) == list(ref), what
    for name, array in ref.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, (what, name)
        assert np.array_equal(got[name], array), (what, name)


@pytest.fixture(scope="module")
def processors() -> dict[str, Any]:
    return {name: load_processor(name) for name in (*PRESETS, *QWEN_PRESETS)}


@pytest.fixture(scope="module")
def fast(processors: dict[str, Any]) -> dict[str, ClipFastPath]:
    return {name: ClipFastPath.for_processor(processors[name]) for name in PRESETS}


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_outputs_are_bit_identical_to_transformers(
    processors: dict[str, Any], fast: dict[str, ClipFastPath], preset: str
) -> None:
    spec = read_spec(resolve_processor(preset))
    target = {"llava-1.5": (1, 3, 336, 336), "siglip": (1, 3, 384, 384)}[preset]
    for name, data in corpus():
        image = decode(data)
        assert fast[preset].accepts(image), name
        got = fast[preset].run(image)
        ref = run_processor(processors[preset], image)
        assert ref["pixel_values"].shape == target and ref["pixel_values"].dtype == np.float32, name
        assert_identical(got, ref, f"{preset} {name}")
        # The cost model prices exactly what the fast path writes.
        assert fast[preset].output_shapes(*image.size) == output_shapes(spec, *image.size), name


def test_llava_resize_and_crop_are_the_processors(fast: dict[str, ClipFastPath]) -> None:
    path = fast["llava-1.5"]
    # get_resize_output_image_size truncates the long edge: 336 * 1920 / 1080 = 597.33
    assert path.resized_size(1920, 1080) == (336, 597)
    assert path.resized_size(20, 2000) == (33600, 336)
    assert path.resized_size(500, 336) == (336, 500)  # kept: no resize at all
    assert path.crop_hw == (336, 336) and fast["siglip"].crop_hw is None
    assert path.shortest_edge == 336 and path.resize_hw is None
    assert fast["siglip"].resize_hw == (384, 384) and fast["siglip"].shortest_edge is None
    assert fast["siglip"].resized_size(1920, 1080) == (384, 384)


@pytest.mark.parametrize(
    ("preset", "changes", "shape"),
    [
        ("llava-1.5", {"do_center_crop": False}, (1, 3, 336, 597)),  # the resized image itself
        ("llava-1.5", {"do_convert_rgb": False}, (1, 3, 336, 336)),  # np.array of an RGB image: the same
        ("llava-1.5", {"crop_size": {"height": 224, "width": 300}, "resample": 2}, (1, 3, 224, 300)),
        ("siglip", {"do_center_crop": True, "crop_size": {"height": 301, "width": 383}}, (1, 3, 301, 383)),
        ("siglip", {"size": {"height": 200, "width": 333}, "image_std": [0.3, 0.2, 0.1]}, (1, 3, 200, 333)),
    ],
)
def test_other_covered_settings_are_bit_identical_too(
    tmp_path: Path, preset: str, changes: dict[str, Any], shape: tuple[int, ...]
) -> None:
    config = preset_config(tmp_path / "variant", preset, **changes)
    processor = load_processor(str(config))
    path = ClipFastPath.for_processor(processor)
    spec = read_spec(config)
    for width, height in [(1920, 1080), (61, 97), (3, 2)]:
        image = decode(encode(photo(width, height, seed=height), "JPEG"))
        got = path.run(image)
        assert_identical(got, run_processor(processor, image), f"{changes} {width}x{height}")
        assert path.output_shapes(width, height) == output_shapes(spec, width, height)
    assert path.output_shapes(1920, 1080) == {"pixel_values": (shape, "float32")}


@pytest.mark.parametrize("preset", PRESETS)
def test_bfloat16_outputs_are_the_processors_rounded_as_torch_rounds_them(
    processors: dict[str, Any], preset: str
) -> None:
    path = ClipFastPath.for_processor(processors[preset], pixels="bfloat16")
    for name, data in list(corpus())[:8]:
        image = decode(data)
        got = path.run(image)["pixel_values"]
        ref = torch.from_numpy(run_processor(processors[preset], image)["pixel_values"]).to(torch.bfloat16)
        assert got.dtype == np.uint16, name  # bfloat16 bit patterns: numpy has no bfloat16
        assert np.array_equal(got, ref.view(torch.int16).numpy().view(np.uint16)), name
        assert path.output_shapes(*image.size)["pixel_values"] == (tuple(ref.shape), "bfloat16")


def test_write_fills_a_given_array_and_checks_it(fast: dict[str, ClipFastPath]) -> None:
    image = photo(100, 80)
    ((shape, _),) = fast["llava-1.5"].output_shapes(100, 80).values()
    out = np.full(shape, 7, np.float32)
    fast["llava-1.5"].write(image, {"pixel_values": out})
    assert_identical({"pixel_values": out}, fast["llava-1.5"].run(image), "write vs run")
    with pytest.raises(ValueError, match="pixel_values"):
        fast["llava-1.5"].write(image, {"pixel_values": np.zeros(shape, np.float64)})
    strided = np.zeros((1, 3, 336, 672), np.float32)[..., :336]
    with pytest.raises(ValueError, match="C-contiguous"):
        fast["llava-1.5"].write(image, {"pixel_values": strided})


# -- coverage ---------------------------------------------------------------------------------------


def test_each_preset_gets_its_own_fast_path(processors: dict[str, Any]) -> None:
    assert set(available_presets()) == {*PRESETS, *QWEN_PRESETS}
    for name in PRESETS:
        assert type(fast_path_for(processors[name])) is ClipFastPath, name
        with pytest.raises(NotCovered, match="is not Qwen2VLImageProcessorPil"):
            Qwen2VLFastPath.for_processor(processors[name])
    for name in QWEN_PRESETS:
        assert type(fast_path_for(processors[name])) is Qwen2VLFastPath, name
        with pytest.raises(NotCovered, match="is not CLIPImageProcessorPil or SiglipImageProcessorPil"):
            ClipFastPath.for_processor(processors[name])


@pytest.mark.parametrize("preset", PRESETS)
def test_uint8_transport_is_refused(processors: dict[str, Any], preset: str) -> None:
    with pytest.raises(NotCovered, match="only for the Qwen2-VL family"):
        ClipFastPath.for_processor(processors[preset], pixels="uint8")
    assert fast_path_for(processors[preset], pixels="uint8") is None
    with pytest.raises(ValueError, match="pixels must be one of"):
        ClipFastPath.for_processor(processors[preset], pixels="float16")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("flag", ["do_resize", "do_rescale", "do_normalize"])
def test_each_required_flag_off_is_refused(tmp_path: Path, preset: str, flag: str) -> None:
    processor = load_processor(str(preset_config(tmp_path / flag, preset, **{flag: False})))
    with pytest.raises(NotCovered, match=f"{flag} is False"):
        ClipFastPath.for_processor(processor)
    assert fast_path_for(processor) is None


@pytest.mark.parametrize(
    ("preset", "changes", "match"),
    [
        ("llava-1.5", {"crop_size": {"height": 400, "width": 336}}, "transformers pads"),
        ("siglip", {"do_center_crop": True, "crop_size": {"height": 384, "width": 385}}, "transformers pads"),
        ("llava-1.5", {"size": {"shortest_edge": 336, "longest_edge": 500}}, "only shortest_edge"),
        ("siglip", {"size": {"max_height": 384, "max_width": 384}}, "only shortest_edge"),
        ("siglip", {"image_mean": 0.5}, "image_mean 0.5"),
    ],
)
def test_settings_it_does_not_cover_are_refused(
    tmp_path: Path, preset: str, changes: dict[str, Any], match: str
) -> None:
    processor = load_processor(str(preset_config(tmp_path / "variant", preset, **changes)))
    with pytest.raises(NotCovered, match=match):
        ClipFastPath.for_processor(processor)


@pytest.mark.parametrize("preset", PRESETS)
def test_changed_attributes_and_subclasses_are_refused(processors: dict[str, Any], preset: str) -> None:
    for key, value, match in [
        ("resample", "bicubic", "resample 'bicubic' is not a PIL resampling filter"),
        ("resample", None, "resample None is not a PIL resampling filter"),  # transformers would use bilinear
        ("resample", int(Image.Resampling.MKS2021), "is not a PIL resampling filter"),  # not one transformers names
        ("do_pad", True, "do_pad is True"),
    ]:
        changed = copy.copy(processors[preset])
        setattr(changed, key, value)
        with pytest.raises(NotCovered, match=match):
            ClipFastPath.for_processor(changed)

    class Custom(type(processors[preset])):  # type: ignore[misc]
        pass  # a subclass may override any step: not covered, whatever it overrides

    custom = copy.copy(processors[preset])
    custom.__class__ = Custom
    with pytest.raises(NotCovered, match="Custom is not"):
        ClipFastPath.for_processor(custom)
    assert fast_path_for(custom) is None


@pytest.mark.parametrize("preset", PRESETS)
def test_a_processor_that_differs_where_the_table_cannot_see_fails_the_self_check(preset: str) -> None:
    processor = load_processor(preset)
    original = processor.resize

    def bilinear(image: Any, size: Any, resample: Any = None, **kwargs: Any) -> Any:
        return original(image, size=size, resample=Image.Resampling.BILINEAR, **kwargs)

    processor.resize = bilinear  # same class, same flags: only running it shows the difference
    with pytest.raises(SelfCheckFailed, match="self-check failed on a 97x61 image: pixel_values differs"):
        ClipFastPath.for_processor(processor)
    assert fast_path_for(processor) is None


def test_a_crop_that_moved_fails_the_self_check_on_the_kept_image() -> None:
    processor = load_processor("llava-1.5")
    original = processor.center_crop

    def off_by_one(image: np.ndarray, size: Any, **kwargs: Any) -> Any:
        return original(image[..., :, 1:], size, **kwargs)  # one column to the right of transformers' crop

    processor.center_crop = off_by_one
    with pytest.raises(SelfCheckFailed, match="on a 341x336 image"):
        ClipFastPath.for_processor(processor)


# -- the worker -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_worker_writes_the_same_arena_bytes_with_the_fast_path_on_and_off(tmp_path: Path, preset: str) -> None:
    spec = read_spec(resolve_processor(preset))
    images = {name: data for name, data in corpus() if name in ("jpeg-1920x1080", "jpeg-333x517", "png-rgba")}
    largest = max(output_nbytes(spec, *decode(d).size) for d in images.values())
    arena = Arena.create(
        segment_name(f"fastclip-{uuid.uuid4().hex[:8]}"), 3 * reservation_size(largest), directory=str(tmp_path)
    )
    try:
        on = WorkerSetup(preset, arena.name, str(tmp_path), fast_path=True)()
        off = WorkerSetup(preset, arena.name, str(tmp_path), fast_path=False)()
        assert isinstance(on.fast, ClipFastPath) and off.fast is None
        for name, data in images.items():
            size = decode(data).size
            expected = output_shapes(spec, *size)  # the cost model's, checked by the worker
            runs = []
            for state in (on, off):
                extent = arena.reserve(output_nbytes(spec, *size))
                assert extent is not None
                # Garbage first: every byte of the outputs must be written, not left from before.
                arena.ndarray_view(extent, 0, "uint8", (extent.capacity,))[:] = 0xA5
                result = process_image(state, ImageTask(data, extent, expected))
                desc = TensorDescriptor.from_json(result.tensors["pixel_values"])
                payload = bytes(arena.ndarray_view(extent, 0, "uint8", (result.used_nbytes,)))
                runs.append((result, desc, payload, extent))
            (fast_result, fast_desc, fast_bytes, fast_extent), (slow_result, slow_desc, slow_bytes, slow_extent) = runs
            assert fast_result.fast_path and not slow_result.fast_path, name
            assert fast_result.write_s == 0.0 and fast_result.preprocess_s > 0
            assert fast_result.used_nbytes == slow_result.used_nbytes == output_nbytes(spec, *size), name
            assert fast_bytes == slow_bytes, name
            assert (fast_desc.offset - fast_extent.offset, fast_desc.shape, fast_desc.dtype) == (
                slow_desc.offset - slow_extent.offset,
                slow_desc.shape,
                slow_desc.dtype,
            ), name
            assert list(fast_desc.shape) == list(expected["pixel_values"][0]), name
            for *_, extent in runs:
                arena.free(extent)
    finally:
        arena.close()


def test_worker_setup_with_uint8_transport_leaves_clip_to_transformers(tmp_path: Path) -> None:
    arena = Arena.create(segment_name(f"fastclip-{uuid.uuid4().hex[:8]}"), 4 << 20, directory=str(tmp_path))
    try:
        state = WorkerSetup("llava-1.5", arena.name, str(tmp_path), fast_path=True, pixels="uint8")()
        assert state.fast is None
    finally:
        arena.close()
