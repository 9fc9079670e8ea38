"""A tiny but real Qwen2-VL checkpoint with random weights, for tests and benchmarks without a model hub.

``make_tiny_model(dir)`` writes everything ``engine.model.VLModel.load`` reads from a real Qwen2-VL
checkpoint: ``config.json`` + ``model.safetensors`` (``Qwen2VLForConditionalGeneration`` at toy
dimensions), ``generation_config.json``, a byte-level BPE tokenizer trained here on a fixed text
(``tokenizer.json`` + ``tokenizer_config.json``, a ``Qwen2Tokenizer`` with Qwen2-VL's special tokens),
the Qwen2-VL chat template, and ``preprocessor_config.json`` copied from the sidecar's ``qwen2-vl``
preset. That last file is the contract: the sidecar's preset produces exactly the tensors
(``pixel_values``, ``image_grid_thw``) this model consumes, so patch size, temporal patch size and
merge size here are the preset's.

Dimensions are chosen so that tensor parallelism with two ranks can shard every planned layer
(4 attention heads, 2 key/value heads, even MLP width and vocabulary), and so that the pitfalls
listed in FACTS.md cannot bite: the vision merger's output width equals the text hidden size,
``mrope_section`` sums to half the text head dimension, and bos/eos/pad ids are ids of this vocabulary.

The output only depends on ``seed``: the tokenizer's training is deterministic and the weights are
drawn from ``torch.manual_seed(seed)``. The language-model head rows of the special tokens (and of the
padding ids above the tokenizer's vocabulary) are zeroed, so greedy decoding of this random model never
emits a stop token or an image placeholder: a test that asks for N new tokens gets N.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_MODEL_NAME",
    "default_model_dir",
    "ensure_tiny_model",
    "make_tiny_model",
]

# Qwen2-VL's special tokens, first so they get ids 0..6 (ids are what config.json refers to).
SPECIAL_TOKENS: Final[tuple[str, ...]] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_ENDOFTEXT, _IM_START, _IM_END, _VISION_START, _VISION_END, _IMAGE_PAD, _VIDEO_PAD = range(len(SPECIAL_TOKENS))

# The chat template of Qwen/Qwen2-VL-7B-Instruct, unchanged, so that prompts built for the tiny model
# have the shape of prompts built for the real one (default system turn, one vision block per image part).
CHAT_TEMPLATE: Final[str] = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE_REGEX: Final[str] = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_VOCAB_TARGET: Final[int] = 400
# A fixed text to learn merges from: words a prompt about an image is made of, so prompts tokenize
# into a realistic mix of whole words and pieces. Changing it changes every token id.
_CORPUS: Final[tuple[str, ...]] = (
    "You are a helpful assistant. Describe the image in one sentence.",
    "What is in this picture? Describe this image. What color is the car on the left?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A photo of a cat sitting on a red chair in front of a window with white curtains.",
    "Count the people in the picture and tell me what they are doing.",
    "Read the text on the sign. Compare the two images and list the differences.",
    "There is a mountain, a lake, some trees and a small house under a blue sky.",
    "system user assistant image picture photo video frame describe explain answer question",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
    "Is this a dog or a cat? Where was this photo taken? Which object is the largest?",
)

_PRESET: Final[Path] = Path(__file__).resolve().parent.parent / "config" / "processors" / "qwen2-vl"
_PREPROCESSOR_CONFIG: Final[str] = "preprocessor_config.json"

# Text model: head_dim = 128 / 4 = 32, so mrope_section must sum to 16. 32 is the smallest head_dim
# vLLM's CPU attention accepts (FACTS.md): with 16 its first request kills the engine. Four heads and
# two key/value heads keep two-rank tensor parallelism possible in the reference engine.
_HIDDEN: Final[int] = 128
_HEADS: Final[int] = 4
_KV_HEADS: Final[int] = 2
_MROPE_SECTION: Final[list[int]] = [4, 6, 6]

# Bumped whenever the checkpoint's shape changes, so a cached copy of an older shape is not reused.
TINY_MODEL_NAME: Final[str] = "tiny-qwen2-vl-h32"


def default_model_dir() -> Path:
    """Where `run`, the benchmarks and the vLLM tier keep the tiny checkpoint (built on first use)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mm-sidecar" / TINY_MODEL_NAME


def _train_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, wrapped as ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import Qwen2Tokenizer  # noqa: PLC0415 - heavy: only when a checkpoint is built

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text (any language, emoji) tokenizes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS) * 4, trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != token_id:
            raise RuntimeError(f"tokenizer training put {token} at {backend.token_to_id(token)}, expected {token_id}")
    # As in Qwen2-VL-7B-Instruct: no bos, eos is the end of a turn, pad is <|endoftext|>.
    wrapper: Any = Qwen2Tokenizer  # its stubs say unk_token must be a str; None (no unknown token) is what Qwen2 uses
    tokenizer = wrapper(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(vocab_size: int, preprocessor: dict[str, Any]) -> Any:
    from transformers import Qwen2VLConfig  # noqa: PLC0415

    return Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": _HIDDEN,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": _HEADS,
            "num_key_value_heads": _KV_HEADS,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": _MROPE_SECTION},
            "bos_token_id": _ENDOFTEXT,
            "eos_token_id": _IM_END,
            "pad_token_id": _ENDOFTEXT,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            # The merger projects vision features to this width; it must be the text hidden size.
            "hidden_size": _HIDDEN,
            "in_channels": 3,
            "patch_size": preprocessor["patch_size"],
            "temporal_patch_size": preprocessor["temporal_patch_size"],
            "spatial_merge_size": preprocessor["merge_size"],
        },
        image_token_id=_IMAGE_PAD,
        video_token_id=_VIDEO_PAD,
        vision_start_token_id=_VISION_START,
        vision_end_token_id=_VISION_END,
        tie_word_embeddings=False,
        dtype="float32",
    )


def make_tiny_model(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen2-VL checkpoint into ``directory`` (created; files overwritten)."""
    import torch  # noqa: PLC0415
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration  # noqa: PLC0415

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    preprocessor = json.loads((_PRESET / _PREPROCESSOR_CONFIG).read_text(encoding="utf-8"))

    tokenizer = _train_tokenizer()
    # Padded up to a multiple of 64 like real checkpoints: keeps the vocabulary even for TP sharding.
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = _config(vocab_size, preprocessor)

    # fork_rng: building a model must not move the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = Qwen2VLForConditionalGeneration(config)
        model.eval()
    with torch.no_grad():
        # Zero logits for specials and padding ids: a random model would otherwise stop early or emit
        # image placeholders, neither of which a test asking for N tokens wants (see module docstring).
        model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0
        model.lm_head.weight[len(tokenizer) :] = 0.0
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=_ENDOFTEXT,
        eos_token_id=[_IM_END, _ENDOFTEXT],
        pad_token_id=_ENDOFTEXT,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copyfile(_PRESET / _PREPROCESSOR_CONFIG, out / _PREPROCESSOR_CONFIG)
    return out


def ensure_tiny_model(directory: str | Path, *, seed: int = 0) -> Path:
    """``directory`` holding a tiny checkpoint, built only when it does not exist yet.

    The checkpoint is built in a sibling temporary directory and renamed into place, so concurrent
    callers (test workers, TP ranks) never see a half-written one: a loser of the race discards its copy.
    """
    out = Path(directory)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        make_tiny_model(staging, seed=seed)
        try:
            os.rename(staging, out)
        except OSError:
            # Someone else finished first (the target now exists and is not empty): theirs is as good.
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
