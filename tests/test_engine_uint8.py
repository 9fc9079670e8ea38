"""The reference engine takes uint8 pixel_values (`preprocess.transport_dtype: uint8`) and normalises them itself.

The uint8 patches are what the checkpoint's own image processor makes with ``do_rescale=False,
do_normalize=False``; the engine must turn them into exactly the float32 the processor makes with its
defaults (bit for bit), so that a uint8 request and a float32 request for the same image are the same
request to the model. The engine checks a part's ``normalize`` against its own processor and refuses,
naming the part, what does not fit. The server tests run one real engine of two ranks (gloo, CPU),
started by the launcher, reading an arena this module writes, as the sidecar's workers do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
import torch

from bench.images import photo_jpeg
from engine.model import ImageNormalization, VLModel
from engine.tiny import ensure_tiny_model
from preprocess import processors
from preprocess.arena import Arena, segment_name
from preprocess.extents import pack_tensors
from preprocess.processors import bfloat16_bits, decode, load_processor, run_processor
from preprocess.protocol import TensorDescriptor

from .conftest import engine_process

MiB = 1 << 20
START_TIMEOUT_S = 180
SIZES = ((56, 56), (333, 517), (640, 480), (57, 300), (1280, 960))
PROMPT = "Describe"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> VLModel:
    return VLModel.load(tiny_dir, tp=False)


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> Any:
    """The checkpoint's own image processor, loaded as the engine's server loads it."""
    return load_processor(str(tiny_dir))


def tensors(processor: Any, width: int, height: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the processor's float32 outputs, its raw patches as uint8) for one photo-like JPEG."""
    image = decode(photo_jpeg(width, height, seed))
    normalised = run_processor(processor, image)
    raw = processor(images=image, return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"]
    u8 = raw.astype(np.uint8)
    assert np.array_equal(u8, raw)  # whole numbers in 0..255: the resize ran on the uint8 image
    assert u8.shape == normalised["pixel_values"].shape
    return normalised, u8


def torch_image(pixel_values: np.ndarray, grid: np.ndarray) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.from_numpy(pixel_values), "image_grid_thw": torch.from_numpy(grid)}


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": PROMPT}, *parts]}]


# -- the model: build_inputs ---------------------------------------------------------------------------


def test_the_model_reads_its_processors_normalisation(model: VLModel, processor: Any) -> None:
    own = model.normalization
    assert own is not None
    assert own == ImageNormalization(
        float(processor.rescale_factor),
        tuple(float(v) for v in processor.image_mean),
        tuple(float(v) for v in processor.image_std),
    )
    assert own.to_json() == {
        "rescale_factor": 0.00392156862745098,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    # What the sidecar's workers put in a uint8 part (where that code is present) is what the model checks.
    raw_normalisation = getattr(processors, "raw_normalisation", None)
    if raw_normalisation is not None:
        assert ImageNormalization.from_json(raw_normalisation(processor), "normalize") == own


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_uint8_pixels_are_normalised_bit_for_bit_as_the_processor_does(
    model: VLModel, processor: Any, width: int, height: int
) -> None:
    normalised, u8 = tensors(processor, width, height, seed=width)
    grid = normalised["image_grid_thw"]
    messages = user({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}})
    from_float = model.build_inputs(messages, [torch_image(normalised["pixel_values"], grid)])
    from_u8 = model.build_inputs(messages, [torch_image(u8, grid)])
    assert from_u8["pixel_values"].dtype == from_float["pixel_values"].dtype
    assert torch.equal(from_u8["pixel_values"], from_float["pixel_values"])
    # Bit for bit, not merely equal (0.0 == -0.0): the same 32-bit patterns.
    assert torch.equal(from_u8["pixel_values"].view(torch.int32), from_float["pixel_values"].view(torch.int32))
    assert set(from_u8) == set(from_float)
    for name in from_float:
        assert torch.equal(from_u8[name], from_float[name]), name
    # The formula itself, in numpy (transformers' arithmetic), and its lookup table agree with the processor.
    own = model.normalization
    assert own is not None
    rows = u8.shape[0]
    x = (u8.astype(np.float64) * own.rescale_factor).astype(np.float32)
    mean, std = np.array(own.image_mean, np.float32), np.array(own.image_std, np.float32)
    x = ((x.reshape(rows, 3, -1) - mean[None, :, None]) / std[None, :, None]).reshape(rows, -1)
    assert np.array_equal(x.view(np.uint32), normalised["pixel_values"].view(np.uint32))


def test_uint8_and_float32_images_mix_in_one_request_and_generate_the_same(model: VLModel, processor: Any) -> None:
    (a, a_u8), (b, _) = tensors(processor, 333, 517, seed=1), tensors(processor, 120, 300, seed=2)
    part = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    messages = user(part, part)
    image_a, image_b = (
        torch_image(a["pixel_values"], a["image_grid_thw"]),
        torch_image(b["pixel_values"], b["image_grid_thw"]),
    )
    plain = model.build_inputs(messages, [image_a, image_b])
    mixed = model.build_inputs(messages, [torch_image(a_u8, a["image_grid_thw"]), image_b])
    assert torch.equal(mixed["pixel_values"], plain["pixel_values"])
    assert model.generate(mixed, max_new_tokens=6) == model.generate(plain, max_new_tokens=6)


def test_the_normalised_pixels_are_a_new_tensor(model: VLModel, processor: Any) -> None:
    # The staged uint8 tensor is a view of a staging buffer the pool reuses: the model must not keep it.
    normalised, u8 = tensors(processor, 56, 56, seed=3)
    staged = torch.from_numpy(u8)
    inputs = model.build_inputs(
        user({"type": "image_url", "image_url": {"url": "data:,"}}), [torch_image(u8, normalised["image_grid_thw"])]
    )
    staged.fill_(0)
    assert torch.equal(inputs["pixel_values"], torch.from_numpy(normalised["pixel_values"]))


def test_a_model_without_a_processor_config_refuses_uint8(tiny_dir: Path, processor: Any, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    loaded = VLModel.load(bare, tp=False)
    assert loaded.normalization is None
    normalised, u8 = tensors(processor, 56, 56, seed=4)
    messages = user({"type": "image_url", "image_url": {"url": "data:,"}})
    with pytest.raises(ValueError, match="image 0: pixel_values are uint8, but this model has no image normalisation"):
        loaded.build_inputs(messages, [torch_image(u8, normalised["image_grid_thw"])])
    loaded.build_inputs(messages, [torch_image(normalised["pixel_values"], normalised["image_grid_thw"])])


def test_other_integer_pixels_are_still_refused(model: VLModel, processor: Any) -> None:
    normalised, u8 = tensors(processor, 56, 56, seed=5)
    messages = user({"type": "image_url", "image_url": {"url": "data:,"}})
    with pytest.raises(ValueError, match=r"image 0: pixel_values must be floating point or uint8, got torch\.int64"):
        model.build_inputs(messages, [torch_image(u8.astype(np.int64), normalised["image_grid_thw"])])
    with pytest.raises(ValueError, match="image 0: pixel_values has shape"):  # the shape check holds for uint8 too
        model.build_inputs(messages, [torch_image(u8[:-4], normalised["image_grid_thw"])])


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1, 2], r"normalize: must be an object"),
        ({"rescale_factor": 1.0, "image_mean": [0.5] * 3}, "must have exactly the keys"),
        ({"rescale_factor": 1.0, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "x": 1}, "must have exactly"),
        ({"rescale_factor": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, r"normalize\.rescale_factor"),
        ({"rescale_factor": "1", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, r"normalize\.rescale_factor"),
        ({"rescale_factor": 1.0, "image_mean": 0.5, "image_std": [0.5] * 3}, r"normalize\.image_mean: must be an arr"),
        ({"rescale_factor": 1.0, "image_mean": [0.5, None, 0.5], "image_std": [0.5] * 3}, r"image_mean\[1\]"),
    ],
)
def test_normalize_objects_are_read_strictly(value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageNormalization.from_json(value, "normalize")


def test_normalize_numbers_are_taken_as_given() -> None:
    parsed = ImageNormalization.from_json({"rescale_factor": 1, "image_mean": [0, 0.5], "image_std": [1, 2]}, "n")
    assert parsed == ImageNormalization(1.0, (0.0, 0.5), (1.0, 2.0))


# -- the server: two ranks, real descriptors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="module")
def arena(shm_dir: Path) -> Iterator[Arena]:
    a = Arena.create(segment_name("engine-u8"), 64 * MiB, directory=str(shm_dir))
    yield a
    a.close()


@pytest.fixture(scope="module")
def engine(tiny_dir: Path, shm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    args = ["--model", str(tiny_dir), "--tp", "2", "--shm-dir", str(shm_dir), "--report-checksums"]
    with engine_process(args, log, START_TIMEOUT_S) as url:
        yield url


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


def publish(arena: Arena, arrays: dict[str, np.ndarray], dtypes: dict[str, str] | None = None) -> dict[str, Any]:
    """The arrays written into one extent and published, as a sidecar worker does: their descriptors' JSON.
    `dtypes` names a dtype the array's own does not say (bfloat16 bits in a uint16 array)."""
    offsets, total = pack_tensors([a.nbytes for a in arrays.values()])
    extent = arena.reserve(total)
    assert extent is not None
    descs: dict[str, TensorDescriptor] = {
        n: arena.write(extent, off, a, dtype=(dtypes or {}).get(n))
        for (n, a), off in zip(arrays.items(), offsets, strict=True)
    }
    arena.publish(extent, total)
    return {n: d.to_json() for n, d in descs.items()}


async def chat(
    http: aiohttp.ClientSession, engine: str, part: dict[str, Any], max_tokens: int = 8
) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": "tiny", "max_tokens": max_tokens, "messages": user(part)}
    async with http.post(engine + "/v1/chat/completions", json=body) as resp:
        return resp.status, json.loads(await resp.text()), {k.lower(): v for k, v in resp.headers.items()}


def answer_of(payload: dict[str, Any]) -> tuple[Any, ...]:
    choice = payload["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], payload["usage"]


def sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


async def test_a_uint8_request_answers_as_the_float32_one_on_two_ranks(
    http: aiohttp.ClientSession, engine: str, arena: Arena, processor: Any, model: VLModel
) -> None:
    async with http.get(engine + "/health") as resp:
        assert (await resp.json())["shm"]["pixels"] == ["float32", "bfloat16", "uint8"]
    jpeg = photo_jpeg(333, 517, seed=7)
    normalised, u8 = tensors(processor, 333, 517, seed=7)
    grid = normalised["image_grid_thw"]
    assert model.normalization is not None
    float_part = {"type": "image_tensors", "tensors": publish(arena, dict(normalised))}
    u8_part = {
        "type": "image_tensors",
        "tensors": publish(arena, {"pixel_values": u8, "image_grid_thw": grid}),
        "normalize": model.normalization.to_json(),
    }
    inline = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}}

    status, from_float, headers = await chat(http, engine, float_part)
    assert status == 200, from_float
    status, from_u8, u8_headers = await chat(http, engine, u8_part)
    assert status == 200, from_u8
    status, from_inline, _ = await chat(http, engine, inline)
    assert status == 200, from_inline
    assert answer_of(from_u8) == answer_of(from_float) == answer_of(from_inline)
    # ...and that answer depends on the pixels: another photo of the same size is answered otherwise.
    other, _ = tensors(processor, 333, 517, seed=8)
    status, from_other, _ = await chat(http, engine, {"type": "image_tensors", "tensors": publish(arena, dict(other))})
    assert status == 200 and answer_of(from_other)[0] != answer_of(from_u8)[0]
    assert from_u8["usage"]["prompt_tokens"] > int(grid.prod()) // 4  # the image's placeholders are in it
    # Each rank copied the uint8 bytes themselves (a quarter of the float32's) and normalised its own copy.
    expected = {"pixel_values": sha(u8), "image_grid_thw": sha(grid)}
    assert json.loads(u8_headers["x-mm-tensor-sha256"]) == [[expected], [expected]]
    assert json.loads(headers["x-mm-tensor-sha256"])[0][0]["pixel_values"] == sha(normalised["pixel_values"])


async def test_a_bfloat16_request_is_its_values_in_the_models_dtype_on_two_ranks(
    http: aiohttp.ClientSession, engine: str, arena: Arena, processor: Any
) -> None:
    # preprocess.transport_dtype bfloat16: the processor's float32 rounded (half the bytes); the engine
    # casts them to its float32 model exactly, so the answer is that of those rounded values as float32.
    normalised, _ = tensors(processor, 333, 517, seed=7)
    grid = normalised["image_grid_thw"]
    bits = bfloat16_bits(normalised["pixel_values"])
    widened = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert not np.array_equal(widened, normalised["pixel_values"])  # the rounding is real
    bf16_part = {
        "type": "image_tensors",
        "tensors": publish(arena, {"pixel_values": bits, "image_grid_thw": grid}, {"pixel_values": "bfloat16"}),
    }
    assert bf16_part["tensors"]["pixel_values"]["dtype"] == "bfloat16"
    widened_part = {
        "type": "image_tensors",
        "tensors": publish(arena, {"pixel_values": widened, "image_grid_thw": grid}),
    }
    status, from_bf16, headers = await chat(http, engine, bf16_part)
    assert status == 200, from_bf16
    status, from_widened, _ = await chat(http, engine, widened_part)
    assert status == 200, from_widened
    assert answer_of(from_bf16) == answer_of(from_widened)
    # Each rank copied the bfloat16 bytes themselves, half the float32's.
    expected = {"pixel_values": sha(bits), "image_grid_thw": sha(grid)}
    assert json.loads(headers["x-mm-tensor-sha256"]) == [[expected], [expected]]
    # A bfloat16 part carries no normalisation: its values are normalised already.
    with_norm = {
        **bf16_part,
        "tensors": publish(arena, {"pixel_values": bits, "image_grid_thw": grid}, {"pixel_values": "bfloat16"}),
    }
    with_norm["normalize"] = {"rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    status, refused, _ = await chat(http, engine, with_norm)
    assert status == 400 and "only uint8 pixel_values carry a normalisation" in refused["error"]["message"], refused


async def test_parts_whose_normalize_does_not_fit_are_refused_by_name_and_the_engine_serves_on(
    http: aiohttp.ClientSession, engine: str, arena: Arena, processor: Any, model: VLModel
) -> None:
    normalised, u8 = tensors(processor, 56, 56, seed=8)
    grid = normalised["image_grid_thw"]
    assert model.normalization is not None
    own = model.normalization.to_json()
    u8_tensors = publish(arena, {"pixel_values": u8, "image_grid_thw": grid})
    float_tensors = publish(arena, dict(normalised))
    where = "messages[0].content[1].normalize"
    std_changed = {**own, "image_std": [*own["image_std"][:2], own["image_std"][2] + 1e-9]}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"tensors": u8_tensors, "normalize": std_changed},
            f"{where}: {orjson.dumps(std_changed).decode()} does not match this model's image processor "
            f"({orjson.dumps(own).decode()})",
        ),
        (
            {"tensors": u8_tensors, "normalize": {**own, "rescale_factor": 1 / 256}},
            "does not match this model's image processor",
        ),
        ({"tensors": u8_tensors}, f"{where}: uint8 pixel_values need the normalisation they were made for"),
        ({"tensors": u8_tensors, "normalize": None}, f"{where}: uint8 pixel_values need the normalisation"),
        ({"tensors": float_tensors, "normalize": own}, f"{where}: only uint8 pixel_values carry a normalisation"),
        ({"tensors": u8_tensors, "normalize": {**own, "image_mean": [0.5]}}, f"{where}.image_mean: has 1 values"),
        ({"tensors": u8_tensors, "normalize": {"rescale_factor": 1.0}}, f"{where}: must have exactly the keys"),
    ]
    for fields, message in cases:
        status, payload, headers = await chat(http, engine, {"type": "image_tensors", **fields})
        assert status == 400, (fields, payload)
        error = payload["error"]
        assert error["message"].startswith(where), error
        assert message in error["message"], (message, error)
        assert error["param"] == where and error["code"] == "invalid_value"
        assert "x-mm-tensor-sha256" not in headers  # refused before any rank copied anything
    # Healthy, and the same extents are taken when the part is right.
    async with http.get(engine + "/health") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    status, good, _ = await chat(http, engine, {"type": "image_tensors", "tensors": u8_tensors, "normalize": own})
    assert status == 200, good
    status, plain, _ = await chat(http, engine, {"type": "image_tensors", "tensors": float_tensors})
    assert status == 200 and answer_of(good) == answer_of(plain)
