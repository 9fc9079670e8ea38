"""Tests for preprocess/fastpath.py and its use by the workers: bit parity with transformers, or transformers.

* parity: ``Qwen2VLFastPath.run(decode(bytes))`` equals ``run_processor(load_processor(preset), decode(bytes))``
  bit for bit (values, dtypes, shapes) over a corpus of sizes and modes, for both Qwen presets and for a
  processor at transformers' default max_pixels (where 1080p is scaled down), and refuses the same sizes;
* coverage: processors and images the fast path does not cover are refused, with a reason, and the
  worker runs transformers for them; a processor that differs where the fast path cannot see it (its
  resize overridden) is caught by the proof at load;
* the worker: fast path on and off write the same bytes into the arena, in-process and through real
  worker processes (``ImagePipeline``), and the cost model predicts exactly what the fast path writes.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
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

from preprocess import worker
from preprocess.arena import Arena, segment_name
from preprocess.cost import output_nbytes, output_shapes
from preprocess.extents import reservation_size
from preprocess.fastpath import NotCovered, Qwen2VLFastPath, SelfCheckFailed
from preprocess.fastpath_clip import ClipFastPath
from preprocess.pipeline import ImagePipeline
from preprocess.processors import CONFIG_NAME, decode, load_processor, read_spec, resolve_processor, run_processor
from preprocess.protocol import ArenaReader, TensorDescriptor
from preprocess.worker import ImageTask, WorkerSetup, fast_path_for, process_image
from sidecar.config import from_mapping

QWEN_PRESETS = ("qwen2-vl", "qwen2.5-vl")
SHM = "/dev/shm"


def encode(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth fields plus noise: every value range, neighbours that differ (a layout bug shows)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 6, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 4, height, dtype=np.float32)[:, None, None]
    base = 128 + 100 * np.sin(x + y * np.array([1.0, 1.7, 2.3], np.float32))
    pixels = np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def corpus() -> Iterator[tuple[str, bytes]]:
    """(name, encoded bytes): the sizes and modes the parity claim must hold for."""
    for width, height in [
        (28, 28),  # one patch-merge block, but below min_pixels (3136): scaled up to 56x56
        (56, 56),  # exactly a size smart_resize keeps: no resize at all
        (1, 1),
        (20, 30),  # below min_pixels
        (333, 517),  # odd sizes
        (1280, 720),
        (1920, 1080),
        (3000, 16),  # aspect ratio 187.5: near the limit of 200
        (15, 2900),
    ]:
        yield f"jpeg-{width}x{height}", encode(photo(width, height), "JPEG", quality=90)
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (150, 211, 4), dtype=np.uint8))
    yield "png-rgba", encode(rgba, "PNG")
    yield "png-gray", encode(photo(300, 200).convert("L"), "PNG")
    yield "jpeg-gray", encode(photo(640, 480).convert("L"), "JPEG")
    palette = photo(257, 190).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    yield "png-palette", encode(palette, "PNG")
    yield "png-palette-transparent", encode(palette, "PNG", transparency=5)
    yield "gif", encode(palette, "GIF")


def assert_identical(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], what: str) -> None:
    assert list(got) == list(ref), what
    for name, array in ref.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, (what, name)
        assert np.array_equal(got[name], array), (what, name)


@pytest.fixture(scope="module")
def processors() -> dict[str, Any]:
    return {name: load_processor(name) for name in (*QWEN_PRESETS, "llava-1.5", "siglip")}


@pytest.fixture(scope="module")
def fast(processors: dict[str, Any]) -> dict[str, Qwen2VLFastPath]:
    return {name: Qwen2VLFastPath.for_processor(processors[name]) for name in QWEN_PRESETS}


@pytest.fixture(scope="module")
def fast_raw(processors: dict[str, Any]) -> dict[str, Qwen2VLFastPath]:
    """preprocess.transport_dtype uint8: the processor's raw patches."""
    return {name: Qwen2VLFastPath.for_processor(processors[name], pixels="uint8") for name in QWEN_PRESETS}


@pytest.fixture(scope="module")
def fast_bf16(processors: dict[str, Any]) -> dict[str, Qwen2VLFastPath]:
    """preprocess.transport_dtype bfloat16: the processor's float32 rounded to bfloat16."""
    return {name: Qwen2VLFastPath.for_processor(processors[name], pixels="bfloat16") for name in QWEN_PRESETS}


def qwen_config(directory: Path, **changes: Any) -> Path:
    """The qwen2-vl preset's config with `changes` (a None value removes the key)."""
    return preset_config(directory, "qwen2-vl", **changes)


def preset_config(directory: Path, preset: str, **changes: Any) -> Path:
    """A preset's config with `changes` (a None value removes the key)."""
    config = json.loads((resolve_processor(preset) / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    return directory


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_outputs_are_bit_identical_to_transformers(
    processors: dict[str, Any], fast: dict[str, Qwen2VLFastPath], preset: str
) -> None:
    spec = read_spec(resolve_processor(preset))
    for name, data in corpus():
        image = decode(data)
        assert fast[preset].accepts(image), name
        got = fast[preset].run(image)
        assert_identical(got, run_processor(processors[preset], image), f"{preset} {name}")
        # The cost model prices exactly what the fast path writes.
        expected = output_shapes(spec, *image.size)
        assert {k: (v.shape, v.dtype.name) for k, v in got.items()} == expected, name


@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_raw_outputs_are_bit_identical_to_transformers_raw_call(
    processors: dict[str, Any], fast_raw: dict[str, Qwen2VLFastPath], preset: str
) -> None:
    # uint8 transport: what run_processor(raw=True) returns (no rescale, no normalise), a quarter the bytes.
    spec = dataclasses.replace(read_spec(resolve_processor(preset)), pixel_dtype="uint8")
    for name, data in corpus():
        image = decode(data)
        got = fast_raw[preset].run(image)
        assert got["pixel_values"].dtype == np.uint8, name
        assert_identical(got, run_processor(processors[preset], image, raw=True), f"{preset} raw {name}")
        assert {k: (v.shape, v.dtype.name) for k, v in got.items()} == output_shapes(spec, *image.size), name


@pytest.mark.parametrize("preset", QWEN_PRESETS)
def test_bfloat16_outputs_are_the_processors_rounded_as_torch_rounds_them(
    processors: dict[str, Any], fast_bf16: dict[str, Qwen2VLFastPath], preset: str
) -> None:
    spec = dataclasses.replace(read_spec(resolve_processor(preset)), pixel_dtype="bfloat16")
    for name, data in list(corpus())[:6]:
        image = decode(data)
        got = fast_bf16[preset].run(image)
        ref = torch.from_numpy(run_processor(processors[preset], image)["pixel_values"]).to(torch.bfloat16)
        assert got["pixel_values"].dtype == np.uint16, name  # bfloat16 bit patterns: numpy has no bfloat16
        assert np.array_equal(got["pixel_values"], ref.view(torch.int16).numpy().view(np.uint16)), name
        assert {k: v.shape for k, v in got.items()} == {k: v[0] for k, v in output_shapes(spec, *image.size).items()}
        assert output_shapes(spec, *image.size)["pixel_values"][1] == "bfloat16"


def test_a_downscaled_image_is_bit_identical_too(processors: dict[str, Any], fast: dict[str, Qwen2VLFastPath]) -> None:
    # Above the preset's max_pixels (12,845,056): smart_resize scales it down to 3892x3276.
    image = decode(encode(photo(4000, 3330, seed=5), "JPEG", quality=85))
    assert_identical(fast["qwen2-vl"].run(image), run_processor(processors["qwen2-vl"], image), "4000x3330")


def test_at_the_default_max_pixels_1080p_is_scaled_down_identically(tmp_path: Path) -> None:
    # Without min/max_pixels the class defaults apply (max 1,003,520 pixels): 1080p is scaled down.
    processor = load_processor(str(qwen_config(tmp_path / "default", min_pixels=None, max_pixels=None)))
    fast = Qwen2VLFastPath.for_processor(processor)
    assert fast.max_pixels == 28 * 28 * 1280
    for width, height in [(1920, 1080), (4032, 3024), (640, 480)]:
        image = decode(encode(photo(width, height, seed=width), "JPEG"))
        assert_identical(fast.run(image), run_processor(processor, image), f"{width}x{height}")


@pytest.mark.parametrize("size", [(4000, 19), (1, 201)])
def test_sizes_the_processor_refuses_are_refused_the_same_way(
    processors: dict[str, Any], fast: dict[str, Qwen2VLFastPath], size: tuple[int, int]
) -> None:
    image = Image.new("RGB", size, (1, 2, 3))
    with pytest.raises(ValueError) as theirs:
        run_processor(processors["qwen2-vl"], image)
    with pytest.raises(ValueError) as ours:
        fast["qwen2-vl"].run(image)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError):
        fast["qwen2-vl"].output_shapes(*size)


def test_write_fills_given_arrays_and_checks_them(fast: dict[str, Qwen2VLFastPath]) -> None:
    image = photo(100, 80)
    shapes = fast["qwen2-vl"].output_shapes(100, 80)
    outputs = {name: np.full(shape, 7, dtype) for name, (shape, dtype) in shapes.items()}
    fast["qwen2-vl"].write(image, outputs)
    assert_identical(outputs, fast["qwen2-vl"].run(image), "write vs run")
    wrong = dict(outputs, pixel_values=np.zeros(shapes["pixel_values"][0], np.float64))
    with pytest.raises(ValueError, match="pixel_values"):
        fast["qwen2-vl"].write(image, wrong)
    strided = dict(outputs, pixel_values=np.zeros((shapes["pixel_values"][0][0], 2400), np.float32)[:, :1176])
    with pytest.raises(ValueError, match="C-contiguous"):
        fast["qwen2-vl"].write(image, strided)


# -- coverage ---------------------------------------------------------------------------------------


def test_processors_it_does_not_cover_are_refused_with_a_reason(processors: dict[str, Any], tmp_path: Path) -> None:
    for name in ("llava-1.5", "siglip"):
        with pytest.raises(NotCovered, match="is not Qwen2VLImageProcessorPil"):
            Qwen2VLFastPath.for_processor(processors[name])
        assert isinstance(fast_path_for(processors[name]), ClipFastPath)  # preprocess/fastpath_clip.py's
    for key, match in [("do_normalize", "do_normalize is False"), ("do_rescale", "do_rescale is False")]:
        processor = load_processor(str(qwen_config(tmp_path / key, **{key: False})))
        with pytest.raises(NotCovered, match=match):
            Qwen2VLFastPath.for_processor(processor)
    odd_patch = load_processor(str(qwen_config(tmp_path / "patch", patch_size=15)))
    with pytest.raises(NotCovered, match="even number of pixels"):
        Qwen2VLFastPath.for_processor(odd_patch)

    class Custom(type(processors["qwen2-vl"])):  # type: ignore[misc]
        pass  # a subclass may override any step: not covered, whatever it overrides

    custom = copy.copy(processors["qwen2-vl"])
    custom.__class__ = Custom
    with pytest.raises(NotCovered, match="Custom is not"):
        Qwen2VLFastPath.for_processor(custom)


def test_a_processor_that_differs_where_the_table_cannot_see_fails_the_self_check(tmp_path: Path) -> None:
    processor = load_processor("qwen2-vl")
    original = processor.resize

    def bilinear(image: Any, size: Any, resample: Any, factor: int, **kwargs: Any) -> Any:
        return original(image, size=size, resample=Image.Resampling.BILINEAR, factor=factor, **kwargs)

    processor.resize = bilinear  # same class, same flags: only running it shows the difference
    with pytest.raises(SelfCheckFailed, match="self-check failed on a 97x61 image: pixel_values differs"):
        Qwen2VLFastPath.for_processor(processor)
    assert fast_path_for(processor) is None


def test_only_decoded_images_are_accepted(processors: dict[str, Any], fast: dict[str, Qwen2VLFastPath]) -> None:
    for path in (fast["qwen2-vl"], ClipFastPath.for_processor(processors["siglip"])):
        assert path.accepts(Image.new("RGB", (30, 30)))
        assert not path.accepts(Image.new("RGBA", (30, 30)))
        assert not path.accepts(Image.new("L", (30, 30)))
        transparent = Image.new("RGB", (30, 30))
        transparent.info["transparency"] = (0, 0, 0)
        assert not path.accepts(transparent)
        with pytest.raises(ValueError, match="RGB images without transparency"):
            path.run(Image.new("RGBA", (30, 30)))


def test_the_config_switch() -> None:
    assert from_mapping({}).preprocess.fast_path is True
    assert from_mapping({"preprocess": {"fast_path": False}}).preprocess.fast_path is False
    with pytest.raises(ValueError, match=r"preprocess\.fast_path: must be a boolean"):
        from_mapping({"preprocess": {"fast_path": "yes"}})


# -- the worker -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pixels", ["float32", "bfloat16", "uint8"])
def test_worker_writes_the_same_arena_bytes_with_the_fast_path_on_and_off(tmp_path: Path, pixels: str) -> None:
    spec = dataclasses.replace(read_spec(resolve_processor("qwen2-vl")), pixel_dtype=pixels)
    images = {name: data for name, data in corpus() if name in ("jpeg-1920x1080", "jpeg-333x517", "png-rgba")}
    largest = max(output_nbytes(spec, *decode(d).size) for d in images.values())
    name = segment_name(f"fast-{uuid.uuid4().hex[:8]}")
    arena = Arena.create(name, 3 * reservation_size(largest), directory=str(tmp_path))
    try:
        on = WorkerSetup("qwen2-vl", arena.name, str(tmp_path), fast_path=True, pixels=pixels)()
        off = WorkerSetup("qwen2-vl", arena.name, str(tmp_path), fast_path=False, pixels=pixels)()
        assert on.fast is not None and off.fast is None
        assert on.fast.raw == (pixels == "uint8")
        assert on.pixels == off.pixels == pixels
        for name, data in images.items():
            expected = output_shapes(spec, *decode(data).size)
            runs = []
            for state in (on, off):
                extent = arena.reserve(output_nbytes(spec, *decode(data).size))
                assert extent is not None
                # Garbage first: every byte of the outputs must be written, not left from before.
                arena.ndarray_view(extent, 0, "uint8", (extent.capacity,))[:] = 0xA5
                result = process_image(state, ImageTask(data, extent, expected))
                tensors = {k: TensorDescriptor.from_json(v) for k, v in result.tensors.items()}
                payload = bytes(arena.ndarray_view(extent, 0, "uint8", (result.used_nbytes,)))
                runs.append((result, tensors, payload, extent))
                assert tensors["pixel_values"].dtype == pixels, name
            (fast_result, fast_tensors, fast_bytes, _), (slow_result, slow_tensors, slow_bytes, _) = runs
            assert fast_result.fast_path and not slow_result.fast_path, name
            assert fast_result.normalize == slow_result.normalize and (fast_result.normalize is None) == (
                pixels != "uint8"
            )
            assert fast_result.write_s == 0.0 and fast_result.preprocess_s > 0
            assert fast_result.used_nbytes == slow_result.used_nbytes == output_nbytes(spec, *decode(data).size)
            assert fast_bytes == slow_bytes, name
            for key, desc in fast_tensors.items():
                other = slow_tensors[key]
                assert (desc.offset - runs[0][3].offset, desc.shape, desc.dtype, desc.nbytes) == (
                    other.offset - runs[1][3].offset,
                    other.shape,
                    other.dtype,
                    other.nbytes,
                ), (name, key)
            for _, _, _, extent in runs:
                arena.free(extent)
    finally:
        arena.close()


def test_a_worker_whose_processor_is_not_covered_runs_transformers(tmp_path: Path) -> None:
    config = qwen_config(tmp_path / "no-normalize", do_normalize=False)
    spec = read_spec(config)
    data = encode(photo(300, 200), "JPEG")
    arena = Arena.create(segment_name(f"fast-{uuid.uuid4().hex[:8]}"), 4 << 20, directory=str(tmp_path))
    try:
        state = WorkerSetup(str(config), arena.name, str(tmp_path), fast_path=True)()
        assert state.fast is None
        extent = arena.reserve(output_nbytes(spec, 300, 200))
        assert extent is not None
        result = process_image(state, ImageTask(data, extent, output_shapes(spec, 300, 200)))
        assert not result.fast_path
        desc = TensorDescriptor.from_json(result.tensors["pixel_values"])
        got = arena.ndarray_view(extent, desc.offset - extent.offset, "float32", desc.shape)
        assert np.array_equal(got, run_processor(state.processor, decode(data))["pixel_values"])
        del got
        arena.free(extent)
    finally:
        arena.close()


def test_an_image_the_fast_path_does_not_take_goes_to_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # decode() never returns one; a gray image stands in for whatever a future decode policy might.
    gray = photo(90, 60).convert("L")
    monkeypatch.setattr(worker, "decode", lambda _data: gray)
    spec = read_spec(resolve_processor("qwen2-vl"))
    arena = Arena.create(segment_name(f"fast-{uuid.uuid4().hex[:8]}"), 4 << 20, directory=str(tmp_path))
    try:
        state = WorkerSetup("qwen2-vl", arena.name, str(tmp_path), fast_path=True)()
        assert state.fast is not None and not state.fast.accepts(gray)
        extent = arena.reserve(output_nbytes(spec, 90, 60))
        assert extent is not None
        result = process_image(state, ImageTask(b"unused", extent, output_shapes(spec, 90, 60)))
        assert not result.fast_path
        desc = TensorDescriptor.from_json(result.tensors["pixel_values"])
        got = arena.ndarray_view(extent, desc.offset - extent.offset, "float32", desc.shape)
        assert np.array_equal(got, run_processor(state.processor, gray)["pixel_values"])
        del got
        arena.free(extent)
    finally:
        arena.close()


async def test_real_workers_write_the_same_tensors_with_the_fast_path_on_and_off() -> None:
    spec = read_spec(resolve_processor("qwen2-vl"))
    data = encode(photo(1280, 720, seed=9), "JPEG", quality=90)
    width, height = decode(data).size
    reader = ArenaReader(SHM)
    outputs: dict[bool, dict[str, np.ndarray]] = {}
    try:
        for fast_path in (True, False):
            pipeline = ImagePipeline(
                processor="qwen2-vl",
                workers=1,
                task_timeout_s=60,
                instance=f"test-{uuid.uuid4().hex[:8]}",
                directory=SHM,
                size=2 * reservation_size(output_nbytes(spec, width, height)),
                fast_path=fast_path,
            )
            await pipeline.start()
            try:
                hold = pipeline.reserve(output_nbytes(spec, width, height))
                assert hold is not None
                done = await pipeline.process(hold, data, output_shapes(spec, width, height))
                assert done.result.fast_path is fast_path
                outputs[fast_path] = {k: reader.copy_out(d).numpy() for k, d in done.tensors.items()}
                hold.release()
            finally:
                await pipeline.close()
    finally:
        reader.close()
    assert_identical(outputs[True], outputs[False], "pipeline fast vs transformers")
