"""The model side of the reference engine: load a Qwen2-VL-family checkpoint, build its inputs, generate.

``VLModel.load`` loads any Qwen2-VL-family checkpoint directory the same way (the tiny one from
``engine.tiny`` included): ``AutoConfig`` + ``AutoTokenizer`` + ``AutoModelForImageTextToText``,
offline, in the checkpoint's own dtype. With ``tp=True`` it loads inside an already initialised
``torch.distributed`` process group with transformers' ``tp_plan="auto"``, so every rank holds a
shard of each attention and MLP projection and the language-model head gathers full logits on
every rank; greedy decoding therefore picks the same token on every rank.

``build_inputs`` does what a serving engine does with the tensors an image processor produced
elsewhere (here: in the sidecar, read back from shared memory): it renders the chat template, expands
each ``<|image_pad|>`` into one copy per merged patch of its image (``t*h*w // merge_size**2``), and
adds the ``mm_token_type_ids`` the model needs to compute its 3-D (M-RoPE) positions. ``AutoProcessor``
is not used on purpose: it always loads a video processor, which needs torchvision (see FACTS.md), and
an engine that receives ready tensors has no use for the image processor anyway.

Pixels arrive either as the processor's normalised float32 ``pixel_values`` or as its raw uint8 patches
(the sidecar's ``preprocess.transport_dtype: uint8``: the same call with ``do_rescale=False,
do_normalize=False``, the same patch layout, a quarter of the bytes). ``build_inputs`` turns uint8 ones
into exactly the float32 the processor would have made, with the model's own normalisation
(``ImageNormalization``, read from the checkpoint's ``preprocessor_config.json`` by the same loader the
server uses); the server has already checked that a uint8 part was made for that normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch

from preprocess.processors import CONFIG_NAME, load_processor
from preprocess.protocol import ImageNormalization

__all__ = ["SUPPORTED_MODEL_TYPES", "ImageNormalization", "VLModel"]

# The families whose forward takes (pixel_values, image_grid_thw, mm_token_type_ids) and whose chat
# template renders one <|image_pad|> per image part; both share the image processor geometry.
SUPPORTED_MODEL_TYPES: Final[frozenset[str]] = frozenset({"qwen2_vl", "qwen2_5_vl"})

# OpenAI's image content-part types, plus the plain "image" of HF chat templates and the Responses API.
_IMAGE_PART_TYPES: Final[frozenset[str]] = frozenset({"image_url", "image", "input_image"})
_TEXT_PART_TYPES: Final[frozenset[str]] = frozenset({"text", "input_text", "output_text"})


class VLModel:
    """A loaded Qwen2-VL-family model with its tokenizer; one instance per process (per TP rank)."""

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        config: Any,
        name: str,
        normalization: ImageNormalization | None = None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._config = config
        self._name = name
        vision = config.vision_config
        self._image_token_id: int = int(config.image_token_id)
        self._merge_size: int = int(vision.spatial_merge_size)
        patch = int(vision.patch_size)
        # One row of pixel_values is one patch: channels x temporal frames x patch x patch values.
        self._channels: int = int(vision.in_channels)
        self._patch_values: int = self._channels * int(vision.temporal_patch_size) * patch * patch
        self._normalization = normalization
        # uint8 pixel_values -> float32, by lookup (ImageNormalization.table); None: uint8 is refused.
        self._pixel_table: torch.Tensor | None = None
        if normalization is not None:
            if len(normalization.image_mean) != self._channels or len(normalization.image_std) != self._channels:
                raise ValueError(f"the image normalisation {normalization} does not have {self._channels} channels")
            self._pixel_table = torch.from_numpy(normalization.table())
        self._stop_ids, self._pad_id = _stop_and_pad_ids(model, tokenizer)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path, *, tp: bool, device: str = "cpu") -> VLModel:
        """Load the checkpoint in ``directory``; ``tp=True`` shards it over the current process group.

        ``tp=False``: a plain single-process load onto ``device`` ("cpu", "cuda", "cuda:1").
        ``tp=True``: ``torch.distributed`` must already be initialised (gloo on CPU, nccl on GPUs) and
        every rank must call this; transformers places each rank on the current accelerator
        (``cuda:$LOCAL_RANK``) or on the CPU when there is none, so ``device`` must name that device type.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer  # noqa: PLC0415

        path = Path(directory)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a model checkpoint directory (no config.json)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise ValueError(f"{path}: model_type {model_type!r} is not a supported family ({supported})")

        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": "auto"}
        if tp:
            kwargs["distributed_config"] = _tp_config(device)
        elif torch.device(device).type != "cpu":
            # Straight onto the device: a real checkpoint is never materialised in host memory first.
            kwargs["device_map"] = device
        model: Any = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
        model.eval()

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.chat_template is None:
            # Some checkpoints ship the template for the processor only (chat_template.json).
            tokenizer.chat_template = _processor_chat_template(path)
        normalization = _image_normalization(path, int(config.vision_config.in_channels))
        return cls(
            model=model, tokenizer=tokenizer, config=config, name=path.resolve().name, normalization=normalization
        )

    # -- properties ------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The checkpoint directory's name, e.g. "Qwen2-VL-7B-Instruct"."""
        return self._name

    @property
    def device(self) -> torch.device:
        """Where this rank's weights live; ``build_inputs`` puts its tensors there."""
        return torch.device(self._model.device)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end generation (the checkpoint's eos ids); a reply not ending in one hit the limit."""
        return frozenset(self._stop_ids)

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def merge_size(self) -> int:
        return self._merge_size

    @property
    def image_channels(self) -> int:
        return self._channels

    @property
    def normalization(self) -> ImageNormalization | None:
        """What uint8 pixel_values are normalised with: the checkpoint's image processor's; None when the
        checkpoint has none that rescales and normalises, and uint8 pixel_values are then refused."""
        return self._normalization

    # -- inputs ------------------------------------------------------------------------------------

    def image_tokens(self, image_grid_thw: torch.Tensor) -> int:
        """Placeholder tokens one image occupies in the prompt: ``t*h*w // merge_size**2``."""
        t, h, w = (int(v) for v in image_grid_thw.reshape(-1).tolist())
        return t * h * w // (self._merge_size * self._merge_size)

    def build_inputs(
        self, messages: Sequence[Mapping[str, Any]], images: Sequence[Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Model inputs (batch of one) for OpenAI chat ``messages`` and the tensors of their images.

        ``images[i]`` holds ``pixel_values`` (patches x values) and ``image_grid_thw`` (1 x 3) of the
        i-th image part in message order. ``pixel_values`` are the processor's floating-point output,
        or its raw uint8 patches, which are normalised here with the model's own ``normalization``
        into exactly the float32 the processor would have made. Raises ``ValueError`` naming the
        message, part or image that does not fit.
        """
        prompt_messages, image_parts = _template_messages(messages)
        if image_parts != len(images):
            raise ValueError(
                f"messages have {image_parts} image part(s) but {len(images)} image tensor set(s) were given"
            )
        grids: list[torch.Tensor] = []
        pixels: list[torch.Tensor] = []
        counts: list[int] = []
        for index, image in enumerate(images):
            grid, pixel_values = self._check_image(index, image)
            grids.append(grid)
            pixels.append(self._normalized(pixel_values) if pixel_values.dtype == torch.uint8 else pixel_values)
            counts.append(self.image_tokens(grid))

        text = self._tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        # The template already holds every special token the model expects; the tokenizer must add none.
        ids: list[int] = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        placeholders = ids.count(self._image_token_id)
        if placeholders != len(images):
            # The template put a different number of placeholders than there are image parts: message
            # text that spells out the placeholder token, or a template that renders images otherwise.
            token = self._tokenizer.convert_ids_to_tokens(self._image_token_id)
            raise ValueError(
                f"the prompt holds {placeholders} {token} placeholder(s) for {len(images)} image(s); "
                f"message text must not contain {token}"
            )

        expanded: list[int] = []
        next_image = iter(counts)
        for token_id in ids:
            if token_id == self._image_token_id:
                expanded.extend([token_id] * next(next_image))
            else:
                expanded.append(token_id)

        device = self.device
        input_ids = torch.tensor([expanded], dtype=torch.long, device=device)
        inputs: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            # 1 marks image positions: the model derives the M-RoPE 3-D positions from it (FACTS.md).
            "mm_token_type_ids": (input_ids == self._image_token_id).to(torch.long),
        }
        if images:
            inputs["pixel_values"] = torch.cat(pixels).to(device=device, dtype=self._model.dtype)
            inputs["image_grid_thw"] = torch.cat(grids).to(device=device)
        return inputs

    def _check_image(self, index: int, image: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (1 x 3 grid, pixel_values) of image ``index``, after checking they describe one image."""
        missing = [key for key in ("pixel_values", "image_grid_thw") if key not in image]
        if missing:
            raise ValueError(f"image {index}: missing tensor(s) {', '.join(missing)}")
        grid = image["image_grid_thw"]
        pixel_values = image["pixel_values"]
        if grid.numel() != 3 or grid.dtype.is_floating_point or grid.dtype.is_complex:
            raise ValueError(f"image {index}: image_grid_thw must be 3 integers (t, h, w), got {list(grid.shape)}")
        grid = grid.reshape(1, 3).to(torch.long)
        t, h, w = (int(v) for v in grid[0].tolist())
        if min(t, h, w) <= 0 or h % self._merge_size or w % self._merge_size:
            raise ValueError(
                f"image {index}: image_grid_thw {[t, h, w]} must be positive with h and w multiples of "
                f"merge_size {self._merge_size}"
            )
        expected = (t * h * w, self._patch_values)
        if pixel_values.dim() != 2 or tuple(pixel_values.shape) != expected:
            raise ValueError(
                f"image {index}: pixel_values has shape {list(pixel_values.shape)}, expected {list(expected)} "
                f"for image_grid_thw {[t, h, w]} (was it made by this model's image processor?)"
            )
        if pixel_values.dtype == torch.uint8:
            if self._pixel_table is None:
                raise ValueError(
                    f"image {index}: pixel_values are uint8, but this model has no image normalisation to apply "
                    "(its preprocessor_config.json does not rescale and normalise)"
                )
        elif not pixel_values.dtype.is_floating_point:
            raise ValueError(f"image {index}: pixel_values must be floating point or uint8, got {pixel_values.dtype}")
        return grid, pixel_values

    def _normalized(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """uint8 raw patches (rows x C*T*P*P, channel-major: column k is channel k // (T*P*P)) as the
        processor's float32 pixel_values, bit for bit, on their own device; a new tensor (never a view
        of a staging buffer). Every rank runs this on its own copy and gets the same bits: a lookup."""
        assert self._pixel_table is not None
        table = self._pixel_table.to(pixel_values.device)
        rows, channels = pixel_values.shape[0], table.shape[0]
        raw = pixel_values.reshape(rows, channels, -1)
        out = torch.empty(raw.shape, dtype=torch.float32, device=pixel_values.device)
        for c in range(channels):  # a channel at a time: the int64 indices take a third of the memory
            out[:, c] = torch.take(table[c], raw[:, c].to(torch.int64))
        return out.reshape(rows, -1)

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        *,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Greedy-decode up to ``max_new_tokens`` tokens; only the new ids, a stop token included if hit.

        Pure greedy: the checkpoint's sampling settings (temperature, top-k, repetition penalty) are not
        applied, only its stop and pad ids, so every TP rank and every run picks the same tokens.
        ``on_token`` is called with each new id as soon as it is picked, on this thread, in order (the
        ids it sees are the ids returned); it only observes, so the tokens are the same with or without it.
        """
        from transformers import GenerationConfig  # noqa: PLC0415

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        input_ids = inputs["input_ids"]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape (1, length), got {list(input_ids.shape)}")
        generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self._stop_ids,
            pad_token_id=self._pad_id,
        )
        streamer = None if on_token is None else _TokenStreamer(on_token)
        with torch.inference_mode():
            output = self._model.generate(**inputs, generation_config=generation_config, streamer=streamer)
        new_ids: list[int] = output[0, input_ids.shape[1] :].tolist()
        return new_ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens (stop tokens, placeholders)."""
        text: str = self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text


# -- helpers -----------------------------------------------------------------------------------------


class _TokenStreamer:
    """What ``generate(streamer=...)`` calls: ``put`` with the prompt's ids once, then with each step's
    new id (batch of one: a 1-element tensor), and ``end`` when done. Hands the new ids to ``on_token``."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self._on_token = on_token
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self._on_token(int(token_id))

    def end(self) -> None:
        pass


def _tp_config(device: str) -> Any:
    import torch.distributed as dist  # noqa: PLC0415
    from transformers import DistributedConfig  # noqa: PLC0415

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tp=True needs an initialised torch.distributed process group (init_process_group first)")
    # transformers binds each rank to the current accelerator type; a different device type would put
    # the shards somewhere the caller does not expect (and gloo cannot reduce CUDA tensors).
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    expected = accelerator.type if accelerator is not None else "cpu"
    if torch.device(device).type != expected:
        raise ValueError(f"tp=True places ranks on {expected!r} here (the current accelerator), not {device!r}")
    return DistributedConfig(tp_plan="auto", tp_size=dist.get_world_size())


def _image_normalization(path: Path, channels: int) -> ImageNormalization | None:
    """The normalisation of the checkpoint's image processor, loaded as the server loads it
    (``preprocess.processors.load_processor``); None without a ``preprocessor_config.json``."""
    if not (path / CONFIG_NAME).is_file():
        return None
    # The resolved path: a relative one could spell a preset's name, which load_processor would prefer.
    return ImageNormalization.from_processor(load_processor(str(path.resolve())), channels)


def _processor_chat_template(path: Path) -> str:
    import json  # noqa: PLC0415

    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = path / "chat_template.json"
    if legacy.is_file():
        template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    raise ValueError(f"{path}: the checkpoint has no chat template")


def _stop_and_pad_ids(model: Any, tokenizer: Any) -> tuple[list[int], int | None]:
    """Stop ids from the checkpoint's generation config (else the tokenizer's eos), and a pad id."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    stop = [int(configured)] if isinstance(configured, int) else [int(i) for i in configured or ()]
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None and stop:
        # Batch of one: padding never happens, but generate() warns without a pad id.
        pad = stop[0]
    return stop, None if pad is None else int(pad)


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Messages in the form the Qwen2-VL chat template reads, and the number of image parts.

    Text parts keep their text; image parts become ``{"type": "image"}`` (the tensors travel separately);
    anything else is refused with its position, so that the count of image parts here is exactly the
    count of placeholders the template renders.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    out: list[dict[str, Any]] = []
    images = 0
    for m, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{m}] must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{m}].role must be a non-empty string")
        content = message.get("content")
        if content is None:  # an assistant turn that only called tools
            out.append({"role": role, "content": ""})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, Sequence):
            raise ValueError(f"messages[{m}].content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind in _TEXT_PART_TYPES:
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"messages[{m}].content[{p}]: a text part needs a string 'text'")
                parts.append({"type": "text", "text": text})
            elif kind in _IMAGE_PART_TYPES:
                parts.append({"type": "image"})
                images += 1
            else:
                raise ValueError(f"messages[{m}].content[{p}]: unsupported content part type {kind!r}")
        out.append({"role": role, "content": parts})
    return out, images
