"""The vLLM offload plugin's items and parser hook against vLLM's real Qwen2-VL processor, no server.

Run by tests/test_vllm_offload.py with vLLM's interpreter (`.venv-vllm/bin/python`; pytest itself runs
in .venv, which has no vLLM): ``python -m tests.vllm_offload_check MODEL_DIR``. Prints one line per
check and "all checks passed" last; exits non-zero at the first failure.

The reference is `processor.apply` on the PIL image, which calls the HF processor; the offloaded form
is the same image's processor outputs as `OffloadedImage`s through the patched parser. Both must give
the same prompt token ids, placeholders and model inputs, and the offloaded form no HF call.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

os.environ["MM_SIDECAR_VLLM_OFFLOAD"] = "1"
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
PROBE = Path(tempfile.mkdtemp(prefix="mm-vllm-check-")) / "probe.log"
os.environ["MM_SIDECAR_VLLM_PROBE_LOG"] = str(PROBE)  # the plugin's own count of HF-processor calls


def hf_calls() -> list[str]:
    lines = PROBE.read_text().splitlines() if PROBE.exists() else []
    PROBE.unlink(missing_ok=True)
    return [line for line in lines if "call_hf_processor" in line or "preprocess" in line]


def check(label: str, ok: bool, detail: Any = "") -> None:
    print(f"{'ok' if ok else 'FAILED'}: {label}{f' ({detail})' if detail != '' and not ok else ''}", flush=True)
    if not ok:
        raise SystemExit(1)


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def main(model_dir: str) -> int:
    import vllm.renderers.chat_utils as cu
    from vllm.config import ModelConfig
    from vllm.model_executor.models import qwen2_vl
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from engine import vllm_offload as plugin
    from preprocess.processors import load_processor, raw_normalisation

    try:
        plugin.check_vllm_version("0.33.0")
    except plugin.UnsupportedVLLM:
        refused = True
    else:
        refused = False
    check("the version guard refuses vLLM 0.33", refused)
    original_part = cu._parse_chat_message_content_part
    plugin.register()
    plugin.register()  # idempotent: the hooks wrap once
    check("register() patches the chat part parser", cu._parse_chat_message_content_part is not original_part)
    wrapped = qwen2_vl.Qwen2VLMultiModalDataParser._parse_image_data
    plugin.register()
    check("a second register() patches nothing more", qwen2_vl.Qwen2VLMultiModalDataParser._parse_image_data is wrapped)

    # A message of image_tensors parts alone: vLLM's validation leaves a lazy iterator that cannot hold
    # them; the hook gives the message its parts back from the raw body.
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    desc = {"shm": "mm-sidecar-x-1", "offset": 0, "nbytes": 4, "dtype": "float32", "shape": [1, 1]}
    tensors_part = {"type": "image_tensors", "tensors": {"pixel_values": desc, "image_grid_thw": desc}}
    raw = {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [tensors_part]}]}
    request = ChatCompletionRequest.model_validate(raw)
    check("image_tensors alone: vLLM validates a lazy iterator", not isinstance(request.messages[1]["content"], list))
    plugin.restore_tensor_parts(request, json.dumps(raw).encode())
    check("restore_tensor_parts gives the parts back", request.messages[1]["content"] == [tensors_part])
    check("other messages untouched", request.messages[0]["content"] == "s")

    config = ModelConfig(model=model_dir, dtype="float32", mm_processor_cache_gb=0, mm_device_do_normalize=False)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    expect = plugin.expectations(config)
    check("expected dtype float32 without device normalisation", expect["dtype"] == "float32", expect)
    fused = ModelConfig(model=model_dir, dtype="float32", mm_processor_cache_gb=0, mm_device_do_normalize=True)
    raw = plugin.expectations(fused)
    check("expected dtype uint8 with device normalisation", raw["dtype"] == "uint8", raw)
    # The sidecar's uint8 parts carry its processor's normalisation: exactly what vLLM applies on the device.
    ours = raw_normalisation(load_processor(model_dir))
    check("the sidecar's normalisation is vLLM's", ours == raw["normalize"], (ours, raw["normalize"]))
    plugin.check_normalize({"normalize": ours}, "uint8", raw)
    for label, part in (
        ("another std", {"normalize": {**ours, "image_std": [0.5, 0.5, 0.5]}}),
        ("no normalisation", {}),
    ):
        try:
            plugin.check_normalize(part, "uint8", raw)
        except ValueError as exc:
            check(f"uint8 part with {label} refused", "image_tensors.normalize" in str(exc), str(exc))
        else:
            check(f"uint8 part with {label} refused", False)
    try:
        plugin.check_normalize({"normalize": ours}, "float32", expect)
    except ValueError as exc:
        check("float32 part with a normalisation refused", "only uint8" in str(exc), str(exc))
    else:
        check("float32 part with a normalisation refused", False)
    hf = processor.info.get_hf_processor()
    tokenizer = processor.info.get_tokenizer()
    image_token = hf.image_token
    hf_calls()
    images = [image(336, 224, 1), image(200, 120, 2)]
    prompt_text = "<|vision_start|>" + image_token + "<|vision_end|>"
    prompt = tokenizer.encode(f"{prompt_text}{prompt_text}Describe.")

    def apply(mm_data: dict[str, Any]) -> Any:
        items = processor.info.parse_mm_data(mm_data)
        return processor.apply(ProcessorInputs(prompt, items), TimingContext())

    reference = apply({"image": images})
    calls = hf_calls()
    check("the reference calls the HF processor", any("call_hf_processor" in c for c in calls), calls)
    outputs = hf.image_processor(images=images, return_tensors="pt")
    grids = outputs["image_grid_thw"]
    sizes = [int(g.prod()) for g in grids]
    pixels = torch.split(outputs["pixel_values"], sizes)
    offloaded_images = [plugin.OffloadedImage(pv.clone(), g.clone()) for pv, g in zip(pixels, grids, strict=True)]
    hf_calls()
    items = processor.info.parse_mm_data({"image": offloaded_images})
    check(
        "the parser turns OffloadedImages into OffloadedImageItems",
        type(items["image"]).__name__ == "OffloadedImageItems",
        type(items["image"]),
    )
    check("no processor data, only passthrough", items["image"].get_processor_data() == {})
    check("two items", items["image"].get_count() == 2)
    got = processor.apply(ProcessorInputs(prompt, items), TimingContext())
    calls = hf_calls()
    check("no HF processor call for offloaded images", calls == [], calls)
    check("same prompt token ids", got["prompt_token_ids"] == reference["prompt_token_ids"])
    pad = tokenizer.convert_tokens_to_ids(image_token)
    count = got["prompt_token_ids"].count(pad)
    check("<|image_pad|> expanded from the grids", count == sum(sizes) // 4, (count, sizes))
    check("same placeholders", got["mm_placeholders"] == reference["mm_placeholders"])
    want, have = reference["mm_kwargs"].get_data(), got["mm_kwargs"].get_data()
    check("same model input names", sorted(want) == sorted(have), (sorted(want), sorted(have)))
    for name in want:
        check(f"{name} identical", torch.equal(want[name], have[name]))

    mixed = [offloaded_images[0], images[1]]
    try:
        processor.info.parse_mm_data({"image": mixed})
    except ValueError as exc:
        message = str(exc)
    else:
        message = ""
    check("offloaded images and images mixed are refused", "cannot be mixed" in message, message)
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
