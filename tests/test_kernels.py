"""Tests for preprocess/kernels.py and preprocess/_kernels.c: PIL's resize and Qwen2-VL's patches, bit for bit.

* resample equals the installed PIL's ``Image.resize(..., reducing_gap=None)`` for every filter it
  takes, up and down in each direction (Pillow 13's vertical-first case included), with the AVX2 loops
  and with the scalar ones, from a copy of the pixels and from the image's own memory (Arrow), and
  from an image PIL keeps in several blocks; a window of it equals that crop of the whole;
* the proof before first use is not vacuous: the other Pillow pass order fails it;
* patchify equals the numpy steps it replaces, for every transport dtype, on resized and kept sizes;
* bad arguments (sizes, buffers, capsules, filters) raise ValueError or TypeError, never write
  outside the destination.

The whole-output parity against transformers, which runs through these kernels, is tests/test_fastpath.py's.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from preprocess import kernels
from preprocess.fastpath import Qwen2VLFastPath
from preprocess.processors import decode, load_processor, resolve_processor

try:
    from preprocess import _kernels
except ImportError:  # not built: every test here is skipped (the fast paths' own tests still run)
    _kernels = None
KERNEL = kernels.kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason=f"compiled kernels unavailable: {kernels.unavailable()}")


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def jpeg(width: int, height: int) -> Image.Image:
    """A decoded JPEG, as the workers hold one: loaded by PIL's decoder into its own memory."""
    rng = np.random.default_rng(width * height)
    x = np.linspace(0, 6, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 4, height, dtype=np.float32)[:, None, None]
    pixels = np.clip(128 + 100 * np.sin(x + y) + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return decode(buf.getvalue())


@pytest.fixture(params=[True, False], ids=["avx2-if-present", "scalar"])
def simd(request: pytest.FixtureRequest) -> Iterator[bool]:
    _kernels.set_simd(request.param)
    try:
        yield request.param
    finally:
        _kernels.set_simd(True)


def sizes(seed: int, count: int) -> list[tuple[int, int, int, int]]:
    """(source w, h, target w, h): random, plus the edges (1 pixel, equal sides, 4x down, 1.006x up,
    a ~3000x downscale)."""
    rng = np.random.default_rng(seed)
    out = [(1, 1, 7, 5), (7, 5, 1, 1), (64, 64, 64, 17), (64, 64, 17, 64), (1920 // 8, 1080 // 8, 1932 // 8, 1092 // 8)]
    out += [(400, 300, 100, 75), (300, 400, 299, 101), (101, 300, 300, 100), (3, 200, 200, 3)]
    out += [(20000, 3, 7, 3), (3, 20000, 3, 5)]  # thousands of taps per output pixel
    out += [tuple(int(v) for v in rng.integers(1, 260, 4)) for _ in range(count)]  # type: ignore[misc]
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("resample", sorted(kernels.FILTERS))
def test_resize_equals_pil_for_every_filter_and_direction(resample: int, simd: bool) -> None:
    assert KERNEL is not None
    for n, (sw, sh, dw, dh) in enumerate(sizes(resample, 40)):
        image = random_image(sw, sh, n)
        expected = np.asarray(image.resize((dw, dh), resample, reducing_gap=None))
        got = KERNEL.resize(image, dw, dh, resample)
        assert got.shape == (dh, dw, 4)
        assert np.array_equal(got[..., :3], expected), f"{sw}x{sh} -> {dw}x{dh}, filter {resample}, simd {simd}"


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_a_window_is_the_crop_of_the_whole_resize(resample: int, simd: bool) -> None:
    assert KERNEL is not None
    rng = np.random.default_rng(int(resample))
    for n, (sw, sh, dw, dh) in enumerate(sizes(resample + 10, 25)):
        image = random_image(sw, sh, n)
        expected = np.asarray(image.resize((dw, dh), resample, reducing_gap=None))
        left, right = sorted(int(v) for v in rng.integers(0, dw + 1, 2))
        top, bottom = sorted(int(v) for v in rng.integers(0, dh + 1, 2))
        right, bottom = max(right, left + 1), max(bottom, top + 1)
        if right > dw:
            left, right = dw - 1, dw
        if bottom > dh:
            top, bottom = dh - 1, dh
        got = KERNEL.resize(image, dw, dh, resample, (left, top, right, bottom))
        want = expected[top:bottom, left:right]
        assert np.array_equal(got[..., :3], want), f"{sw}x{sh} -> {dw}x{dh} window {(left, top, right, bottom)}"


def test_resize_reads_a_decoded_images_own_memory_and_equals_pil() -> None:
    assert KERNEL is not None
    image = jpeg(640, 360)
    pixels, _alive = KERNEL.source(image)
    assert not isinstance(pixels, bytes), "a one-block RGB image is read through its Arrow export, not copied"
    for w, h in ((644, 364), (322, 182), (448, 252)):
        expected = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None))
        assert np.array_equal(KERNEL.resize(image, w, h, Image.Resampling.BICUBIC)[..., :3], expected)


def test_an_image_in_several_blocks_is_copied_and_still_equal() -> None:
    assert KERNEL is not None
    saved = Image.core.get_block_size()
    Image.core.set_block_size(1 << 16)  # 64 KiB blocks: a 300x200 RGB image (240 KB) spans four
    try:
        image = random_image(300, 200, 7)
        image = image.copy()  # allocated under the small block size
        pixels, _alive = KERNEL.source(image)
        assert isinstance(pixels, bytes)
        expected = np.asarray(image.resize((97, 311), Image.Resampling.LANCZOS, reducing_gap=None))
        assert np.array_equal(KERNEL.resize(image, 97, 311, Image.Resampling.LANCZOS)[..., :3], expected)
    finally:
        Image.core.set_block_size(saved)


def test_the_proof_before_first_use_fails_for_the_other_pillow_pass_order() -> None:
    """kernels._check is what keeps a kernel that differs from PIL out: it must be able to fail."""
    assert KERNEL is not None
    assert kernels._check(_kernels, KERNEL.order) is None
    other = 0 if KERNEL.order == 13 else 13
    reason = kernels._check(_kernels, other)
    assert reason is not None and "differs from PIL's" in reason


@pytest.mark.parametrize("pixels", ["float32", "bfloat16", "uint8"])
@pytest.mark.parametrize("preset", ["qwen2-vl", "qwen2-vl/default"])
def test_patchify_equals_the_numpy_steps(pixels: str, preset: str, simd: bool) -> None:
    name = preset.split("/", maxsplit=1)[0]
    processor = load_processor(resolve_processor(name))
    if preset.endswith("/default"):
        processor.size.longest_edge = 28 * 28 * 40  # scales 1080p-like images down
    compiled = Qwen2VLFastPath.for_processor(processor, pixels=pixels)
    numpy_steps = Qwen2VLFastPath.for_processor(processor, pixels=pixels, use_kernel=False)
    assert compiled.kernel is not None and numpy_steps.kernel is None
    for image in (jpeg(480, 270), jpeg(56, 84), jpeg(113, 67), random_image(224, 224, 3)):
        got, want = compiled.run(image), numpy_steps.run(image)
        for key in ("pixel_values", "image_grid_thw"):
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
            assert np.array_equal(got[key], want[key]), f"{key} {image.size} {pixels}"


def test_bad_arguments_are_refused_without_writing() -> None:
    src = bytes(8 * 6 * 4)
    dst = np.full((5, 7, 4), 17, np.uint8)
    whole = (0, 0, 7, 5)
    cases = [
        ((src, 8, 7, dst, 7, 5, 3, 13, whole), "src: 192 bytes"),  # the size does not match the buffer
        ((src, 8, 6, dst, 7, 6, 3, 13, (0, 0, 7, 6)), "dst: 140 bytes"),
        ((src, 8, 6, dst, 7, 5, 0, 13, whole), "filter 0"),  # NEAREST is PIL's own call
        ((src, 8, 6, dst, 7, 5, 6, 13, whole), "filter 6"),
        ((src, 8, 6, dst, 7, 5, 3, 12, whole), "order 12"),
        ((src, -8, -6, dst, 7, 5, 3, 13, whole), "bad size"),
        ((src, 0, 6, dst, 7, 5, 3, 13, whole), "bad size"),
        ((src, 8, 6, dst, 7, 5, 3, 13, (0, 0, 8, 5)), "not inside the 7x5 output"),
        ((src, 8, 6, dst, 7, 5, 3, 13, (-1, 0, 6, 5)), "not inside"),
        ((src, 8, 6, dst, 7, 5, 3, 13, (3, 0, 3, 5)), "not inside"),  # empty
        ((src, 8, 6, dst, 7, 5, 3, 13, (1, 0, 7, 5)), "dst: 140 bytes, a 6x5"),  # a window smaller than dst
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            _kernels.resample(*args)
    with pytest.raises(TypeError):
        _kernels.resample(src, 8, 6, bytes(140), 7, 5, 3, 13, whole)  # a read-only destination
    with pytest.raises(ValueError, match="arrow_array"):
        _kernels.resample(datetime.datetime_CAPI, 8, 6, dst, 7, 5, 3, 13, whole)  # a capsule, not an Arrow array
    assert (dst == 17).all()
    table = np.zeros((3, 256), np.uint32)
    out = np.full(2 * 4 * 3 * 2 * 196, 5, np.uint32)  # twice what 4 patches of 3 x 2 x 14 x 14 need
    image = bytes(28 * 28 * 4)
    patch_cases = [
        ((image, 28, 28, out, table, 4, 14, 2, 2), "dst: 37632 bytes, the patches need 18816"),
        ((image, 28, 28, out, table, 3, 14, 2, 2), "itemsize 3"),
        ((image, 28, 28, out, table, 2, 14, 2, 2), "table: 3072 bytes"),
        ((image, 28, 28, out, table, 4, 14, 3, 2), "not whole"),
        ((image, 30, 28, out, table, 4, 14, 2, 2), "src: 3136 bytes"),
    ]
    for args, message in patch_cases:
        with pytest.raises(ValueError, match=message):
            _kernels.patchify(*args)
    assert (out == 5).all()


def test_a_nearest_processor_resizes_with_pil_then_patchifies_compiled() -> None:
    """NEAREST is no convolution: PIL resizes, the compiled patchify reads PIL's result in place."""
    processor = load_processor(resolve_processor("qwen2-vl"))
    processor.resample = int(Image.Resampling.NEAREST)
    compiled = Qwen2VLFastPath.for_processor(processor)
    numpy_steps = Qwen2VLFastPath.for_processor(processor, use_kernel=False)
    assert compiled.kernel is not None
    for image in (jpeg(113, 67), jpeg(480, 270)):
        got, want = compiled.run(image), numpy_steps.run(image)
        assert np.array_equal(got["pixel_values"], want["pixel_values"])


def test_without_avx2_pil_resizes_with_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scalar build (no AVX2) leaves the resize to PIL, which is faster there; same bits, windows too."""
    assert KERNEL is not None
    monkeypatch.setattr(KERNEL, "simd", "scalar")
    image = jpeg(300, 200)
    expected = np.asarray(image.resize((211, 97), Image.Resampling.BICUBIC, reducing_gap=None))
    whole = KERNEL.resize(image, 211, 97, Image.Resampling.BICUBIC)
    part = KERNEL.resize(image, 211, 97, Image.Resampling.BICUBIC, (10, 5, 150, 90))
    assert whole.shape == (97, 211, 4) and np.array_equal(whole[..., :3], expected)
    assert part.shape == (85, 140, 4) and np.array_equal(part[..., :3], expected[5:90, 10:150])
