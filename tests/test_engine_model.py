"""The reference engine's model side on the tiny random Qwen2-VL checkpoint: build, load, inputs, greedy generation.

Image tensors come from the sidecar's own ``qwen2-vl`` preset (``preprocess.processors``), which is the
contract the tiny checkpoint is built to: what the sidecar produces is what the model consumes. The TP
test runs two real ranks (gloo on CPU) that shard the checkpoint with ``tp_plan="auto"`` and must agree
with each other and with a plain single-process load, token for token.
"""

from __future__ import annotations

import io
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.model import VLModel
from engine.tiny import ensure_tiny_model, make_tiny_model
from preprocess.processors import decode, load_processor, run_processor

from .conftest import free_port

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "with"},
            {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}},
        ],
    },
]
NEW_TOKENS = 6
STREAMED_TOKENS = 64
TP_TIMEOUT_S = 90.0


def _image_bytes(width: int, height: int, fmt: str) -> bytes:
    # Noise, not a flat color: every patch then differs, so a mix-up of images or patches changes the output.
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> VLModel:
    return VLModel.load(tiny_dir, tp=False)


@pytest.fixture(scope="module")
def images() -> list[dict[str, torch.Tensor]]:
    """Two images of different sizes and formats, through the sidecar's qwen2-vl preset."""
    processor = load_processor("qwen2-vl")
    out = []
    for width, height, fmt in ((224, 168, "PNG"), (120, 300, "JPEG")):
        arrays = run_processor(processor, decode(_image_bytes(width, height, fmt)))
        out.append({name: torch.from_numpy(array) for name, array in arrays.items()})
    return out


# -- the checkpoint ------------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", seed=0)
    b = make_tiny_model(tmp_path / "b", seed=0)
    c = make_tiny_model(tmp_path / "c", seed=1)
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(names)
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    preset = Path(__file__).resolve().parent.parent / "config" / "processors" / "qwen2-vl" / "preprocessor_config.json"
    assert (a / "preprocessor_config.json").read_bytes() == preset.read_bytes()


def test_ensure_tiny_model_builds_only_when_missing(tmp_path: Path) -> None:
    target = tmp_path / "m"
    ensure_tiny_model(target)
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging directory left behind


def test_tiny_config_fits_tp2_and_the_preset(model: VLModel, tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert vision["hidden_size"] == text["hidden_size"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        assert text[key] % 2 == 0, key
    tokenizer = model.tokenizer
    assert tokenizer.convert_ids_to_tokens(config["image_token_id"]) == "<|image_pad|>"
    assert tokenizer.convert_ids_to_tokens(text["eos_token_id"]) == "<|im_end|>"
    assert len(tokenizer) <= text["vocab_size"]
    assert model.model_name == "tiny-qwen2-vl"


# -- inputs ------------------------------------------------------------------------------------------


def test_build_inputs_expands_placeholders_per_image(model: VLModel, images: list[dict[str, torch.Tensor]]) -> None:
    inputs = model.build_inputs(MESSAGES, images)
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1
    counts = [model.image_tokens(image["image_grid_thw"]) for image in images]
    assert counts[0] != counts[1]
    is_image = input_ids[0] == model.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"][0], is_image.long())
    assert torch.equal(inputs["attention_mask"], torch.ones_like(input_ids))
    # Two contiguous runs of placeholders, each as long as its image needs, in message order.
    runs = [len(run) for run in "".join("1" if v else "0" for v in is_image.tolist()).split("0") if run]
    assert runs == counts
    assert torch.equal(inputs["pixel_values"], torch.cat([image["pixel_values"] for image in images]))
    assert torch.equal(inputs["image_grid_thw"], torch.cat([image["image_grid_thw"] for image in images]))
    text = model.tokenizer.decode(input_ids[0].tolist())
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nCompare")
    assert text.endswith(
        "with<|vision_start|>" + "<|image_pad|>" * counts[1] + "<|vision_end|><|im_end|>\n<|im_start|>assistant\n"
    )


def test_build_inputs_text_only(model: VLModel) -> None:
    inputs = model.build_inputs([{"role": "user", "content": "hello"}], [])
    assert "pixel_values" not in inputs
    assert not inputs["mm_token_type_ids"].any()


@pytest.mark.parametrize(
    ("messages", "n_images", "match"),
    [
        (MESSAGES, 1, "2 image part"),
        ([{"role": "user", "content": [{"type": "audio"}]}], 0, r"content\[0\]: unsupported content part type 'audio'"),
        ([{"role": "user", "content": "look: <|image_pad|>"}], 0, "must not contain <|image_pad|>"),
        ([{"content": "x"}], 0, r"messages\[0\]\.role"),
    ],
)
def test_build_inputs_refuses_mismatches(
    model: VLModel, images: list[dict[str, torch.Tensor]], messages: list[dict[str, Any]], n_images: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        model.build_inputs(messages, images[:n_images])


def test_build_inputs_refuses_tensors_that_do_not_describe_the_image(
    model: VLModel, images: list[dict[str, torch.Tensor]]
) -> None:
    first, second = images
    cases: list[tuple[dict[str, torch.Tensor], str]] = [
        (
            {"pixel_values": first["pixel_values"][:-4], "image_grid_thw": first["image_grid_thw"]},
            "image 0: pixel_values",
        ),
        ({"pixel_values": first["pixel_values"], "image_grid_thw": second["image_grid_thw"]}, "image 0: pixel_values"),
        ({"pixel_values": first["pixel_values"]}, "missing tensor"),
        ({"pixel_values": first["pixel_values"], "image_grid_thw": torch.tensor([[1, 3, 4]])}, "multiples of merge"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            model.build_inputs(MESSAGES, [bad, second])


# -- generation ------------------------------------------------------------------------------------------


def test_generate_is_greedy_and_deterministic(model: VLModel, images: list[dict[str, torch.Tensor]]) -> None:
    inputs = model.build_inputs(MESSAGES, images)
    first = model.generate(inputs, max_new_tokens=NEW_TOKENS)
    assert len(first) == NEW_TOKENS
    assert all(isinstance(i, int) for i in first)
    assert model.generate(inputs, max_new_tokens=NEW_TOKENS) == first
    assert isinstance(model.decode(first), str)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(inputs, max_new_tokens=0)


def test_on_token_sees_each_id_as_it_is_picked_and_changes_nothing(
    model: VLModel, images: list[dict[str, torch.Tensor]]
) -> None:
    inputs = model.build_inputs(MESSAGES, images)
    plain = model.generate(inputs, max_new_tokens=STREAMED_TOKENS)
    seen: list[tuple[int, float]] = []
    start = time.perf_counter()
    streamed = model.generate(
        inputs, max_new_tokens=STREAMED_TOKENS, on_token=lambda t: seen.append((t, time.perf_counter()))
    )
    end = time.perf_counter()
    assert [t for t, _ in seen] == streamed == plain  # the prompt's ids are not handed over, only new ones
    # Incremental: the first id was handed over well before generation ended (a ratio of one run's
    # times, not a threshold: this machine is noisy), and the ids arrived spread over the run.
    first, last = seen[0][1] - start, seen[-1][1] - start
    assert first < 0.5 * (end - start), (first, end - start)
    assert last - first > 0.5 * (end - start), (first, last, end - start)


def test_tp_load_needs_a_process_group(tiny_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="process group"):
        VLModel.load(tiny_dir, tp=True)


# -- tensor parallelism ------------------------------------------------------------------------------------


def _tp_rank(rank: int, port: int, directory: str, workdir: str) -> None:
    """One TP rank (spawned): set up the group as torchrun would, load sharded, generate, write the ids."""
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)  # two ranks on two cores: more threads only fight over them
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=TP_TIMEOUT_S))
    try:
        loaded = VLModel.load(directory, tp=True)
        payload = torch.load(Path(workdir) / "inputs.pt")
        inputs = loaded.build_inputs(payload["messages"], payload["images"])
        ids = loaded.generate(inputs, max_new_tokens=NEW_TOKENS)
        (Path(workdir) / f"rank{rank}.json").write_text(json.dumps(ids))
    finally:
        dist.destroy_process_group()


def test_tp2_ranks_agree_with_each_other_and_with_a_plain_load(
    model: VLModel,
    images: list[dict[str, torch.Tensor]],
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch.multiprocessing.spawn import start_processes

    expected = model.generate(model.build_inputs(MESSAGES, images), max_new_tokens=NEW_TOKENS)
    torch.save({"messages": MESSAGES, "images": images}, tmp_path / "inputs.pt")
    # This is the CPU (gloo) path: on a GPU host transformers would otherwise put rank r on cuda:r.
    # The spawned ranks inherit the variable before they first touch CUDA.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    context = start_processes(  # type: ignore[no-untyped-call]
        _tp_rank, args=(free_port(), str(tiny_dir), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TP_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):  # raises ProcessRaisedException with the rank's traceback
            assert time.monotonic() < deadline, "TP ranks did not finish in time"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0] == ranks[1] == expected
