"""Hugging Face image-processor presets, the decode policy, and running a processor on one image.

This module owns the step from an image's bytes to the named tensors a vision-language model
consumes: ``decode`` turns bytes into an upright RGB image, ``run_processor`` calls the model's
image processor on it, and ``ProcessorSpec`` is what the cost model (``cost.py``) needs to know
about that processor to predict the output shapes without running it.

Presets live in ``config/processors/<name>/preprocessor_config.json``, copied field for field from
the public model repos, so ``AutoImageProcessor.from_pretrained(dir)`` builds exactly the
processor those repos build. transformers is imported only inside ``load_processor``: reading a
spec, computing costs and decoding never pull in transformers or torch.

Processors are loaded with the PIL backend pinned (``backend="pil"``). The torchvision backend
resizes differently, so leaving the choice to whether torchvision happens to be installed would
change the tensors (and their timing) under the same config.

Decode policy (``decode``)
--------------------------
1. Open with PIL, restricted to the formats the header probe accepts (``DECODE_FORMATS``). No
   global PIL setting is changed: truncated files are errors, and PIL's decompression-bomb guard
   stays at its default; size limits are the caller's job, from the probed header, before this.
2. First frame only: animated GIF, APNG and WebP and multi-page TIFF give frame 0, which is also
   what ``Image.open`` gives a client that calls the processor itself.
3. EXIF orientation is applied (``ImageOps.exif_transpose``): the model sees the image the way a
   browser, a phone gallery and the user see it. transformers' own ``load_image`` does this; vLLM's
   ``ImageMediaIO.load_bytes`` and SGLang's loader do not (sgl-project/sglang#33464 calls that a
   bug: portrait phone photos, orientation 6, reach the model sideways). Of the engines' choices we
   take the upright one, and say so here because it is a visible difference: an image with an
   orientation tag other than 1 gives different tensors here than a client (or an engine) that runs
   the processor on ``Image.open(bytes)``; for orientations 5-8 even the grid is transposed. The
   output size is then ``probe.ImageHeader.display_size``. (For the Qwen2-VL and CLIP families the
   tensor byte count does not depend on orientation, so admission costs agree either way.)
   TIFF needs no special case: PIL already loads TIFF upright and ``exif_transpose`` then does
   nothing more.
4. Transparency is composited over white, with exactly the rule and arithmetic of the
   processors' own ``convert_to_rgb`` (transformers ``image_transforms.convert_to_rgb``, called by
   every PIL-backend processor with ``do_convert_rgb``): an image has alpha when it has an "A" band
   or a ``transparency`` entry (palette/gray/RGB tRNS, GIF), and then
   ``alpha_composite(white, image.convert("RGBA")).convert("RGB")``. vLLM also composites RGBA over
   white (with ``paste``, other arithmetic that may round differently) but drops palette transparency;
   transformers' ``load_image`` drops alpha altogether (``convert("RGB")``). We follow the
   processor, so that a client calling the processor on ``Image.open(bytes)`` gets the same tensors
   as the sidecar for every image without an orientation tag.
5. Every other mode is converted with PIL's ``convert("RGB")`` (CMYK, gray "L", bilevel "1",
   palette without transparency, YCbCr), as the processor would; ICC profiles are not applied, by
   transformers nor vLLM nor here. That includes 16-bit gray ("I;16" and its byte orders), whose
   values PIL clips at 255, so that a real 16-bit photo comes out nearly white: that is what
   transformers computes from those bytes (its processor and ``load_image`` alike; PIL's 16-bit
   conversions ignore a gray ``transparency`` value too), and parity with it is the rule, so no
   better-looking scaling is done here. The 32-bit "I" and float "F" modes clip the same way.

The result is always a loaded "RGB" image with no ``transparency`` entry. The parity rule, which
``tests/test_processors.py`` checks bit for bit: the sidecar's tensors equal
``processor(images=decode(bytes), return_tensors="np")``, i.e. the processor called directly on
our decoded image; calling the processor again on that image is a no-op conversion.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .protocol import ImageNormalization

__all__ = [
    "CONFIG_NAME",
    "DECODE_FORMATS",
    "PRESETS_DIR",
    "DecodeError",
    "ProcessorError",
    "ProcessorSpec",
    "available_presets",
    "bfloat16_bits",
    "decode",
    "load_processor",
    "read_spec",
    "resolve_processor",
    "run_processor",
]

PRESETS_DIR: Final[Path] = Path(__file__).resolve().parent.parent / "config" / "processors"
CONFIG_NAME: Final[str] = "preprocessor_config.json"

# The formats preprocess/probe/ reads headers for: nothing reaches a decoder the probe did not vet, and
# PIL's other plugins (some of them rarely exercised parsers) stay out of reach of client bytes.
DECODE_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")

_WHITE: Final[tuple[int, int, int, int]] = (255, 255, 255, 255)


class ProcessorError(ValueError):
    """A processor name, directory or config this service cannot use; the message says why."""


class DecodeError(ValueError):
    """Image bytes PIL cannot turn into an RGB image; retrying the same bytes cannot help."""


# -- presets and specs ---------------------------------------------------------------------------


def available_presets() -> tuple[str, ...]:
    """Names of the shipped presets, sorted."""
    if not PRESETS_DIR.is_dir():
        return ()
    return tuple(sorted(p.name for p in PRESETS_DIR.iterdir() if (p / CONFIG_NAME).is_file()))


def resolve_processor(name_or_dir: str) -> Path:
    """The directory holding ``preprocessor_config.json`` for a preset name or a directory path.

    A preset name wins over a same-named relative directory. Names are matched against the list of
    presets, never joined onto ``PRESETS_DIR`` unchecked, so "../x" cannot escape it.
    """
    if name_or_dir in available_presets():
        return PRESETS_DIR / name_or_dir
    path = Path(name_or_dir).expanduser()
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return path.resolve()
    presets = ", ".join(available_presets()) or "none installed"
    raise ProcessorError(
        f"image processor {name_or_dir!r} is neither a preset ({presets}) nor a directory containing {CONFIG_NAME}"
    )


# image_processor_type (without the backend suffix) -> family. The families are the ones whose
# output shapes cost.py can compute; anything else is refused at load, not guessed at run time.
_FAMILIES: Final[Mapping[str, str]] = {
    "Qwen2VLImageProcessor": "qwen2_vl",
    "CLIPImageProcessor": "clip",
    "SiglipImageProcessor": "siglip",
}

# Class-level defaults of the transformers 5.x PIL classes, used where a config omits a key.
_QWEN_DEFAULTS: Final[Mapping[str, Any]] = {
    "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}
_RESIZE_DEFAULTS: Final[Mapping[str, Mapping[str, Any]]] = {
    "clip": {
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
    },
    "siglip": {"do_resize": True, "size": {"height": 224, "width": 224}, "do_center_crop": None, "crop_size": None},
}


@dataclass(frozen=True, slots=True)
class ProcessorSpec:
    """What the cost model needs to know about a processor, read from its config alone.

    ``family`` selects the geometry. "qwen2_vl": ``smart_resize`` between ``min_pixels`` and
    ``max_pixels`` to multiples of ``patch_size * merge_size``, then patches of
    ``temporal_patch_size`` frames. "clip" / "siglip": resize (to ``resize_hw``, or the shortest
    edge to ``shortest_edge``), then an optional center crop to ``crop_hw``. Fields that do not
    apply to a family are ``None``. Sizes are (height, width), as transformers orders them.
    """

    family: str
    processor_type: str
    channels: int = 3
    min_pixels: int | None = None
    max_pixels: int | None = None
    patch_size: int | None = None
    temporal_patch_size: int | None = None
    merge_size: int | None = None
    do_resize: bool = True
    resize_hw: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop_hw: tuple[int, int] | None = None
    # The dtype pixel_values travel in: the processor's normalised float32, those rounded to
    # bfloat16, or (offload with preprocess.transport_dtype: uint8) the raw patches the engine
    # normalises. Not in the file: the sidecar's config sets it (dataclasses.replace).
    pixel_dtype: str = "float32"


def read_spec(directory: str | Path) -> ProcessorSpec:
    """Read a processor's ``ProcessorSpec`` from its ``preprocessor_config.json``.

    Mirrors how transformers 5.x builds the processor from that file (class defaults for missing
    keys; for Qwen2-VL, top-level ``min_pixels``/``max_pixels`` override ``size``) and refuses what
    the processor itself would fail on at call time or what the cost model cannot predict.
    """
    path = Path(directory) / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProcessorError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(config, dict):
        raise ProcessorError(f"{path}: expected a JSON object")
    kind = str(config.get("image_processor_type") or "")
    # "...Fast" (torchvision) and "...Pil" name the same processor; the backend is pinned at load.
    base = kind.removesuffix("Fast").removesuffix("Pil")
    family = _FAMILIES.get(base)
    if family is None:
        supported = ", ".join(sorted(_FAMILIES))
        raise ProcessorError(f"{path}: image_processor_type {kind!r} is not supported (supported: {supported})")
    if family == "qwen2_vl":
        return _qwen_spec(path, config, kind)
    return _resize_spec(path, config, kind, family)


def _positive_int(path: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProcessorError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def _get(config: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    # transformers treats an explicit null like a missing key: the class default applies.
    value = config.get(key)
    return defaults.get(key) if value is None else value


def _qwen_spec(path: Path, config: Mapping[str, Any], kind: str) -> ProcessorSpec:
    if config.get("do_resize") is False:
        raise ProcessorError(f"{path}: do_resize false is not supported: output size would depend on unpatchable input")
    size = _get(config, _QWEN_DEFAULTS, "size")
    if not isinstance(size, Mapping):
        raise ProcessorError(f"{path}: size must be an object, got {size!r}")
    size = dict(size)
    # Qwen2VLImageProcessor.__init__: the legacy top-level keys override the size dict.
    if config.get("min_pixels") is not None:
        size["shortest_edge"] = config["min_pixels"]
    if config.get("max_pixels") is not None:
        size["longest_edge"] = config["max_pixels"]
    # Without both keys the processor raises on every call; refuse at load instead.
    min_pixels = _positive_int(path, "size.shortest_edge (min_pixels)", size.get("shortest_edge"))
    max_pixels = _positive_int(path, "size.longest_edge (max_pixels)", size.get("longest_edge"))
    return ProcessorSpec(
        family="qwen2_vl",
        processor_type=kind,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=_positive_int(path, "patch_size", _get(config, _QWEN_DEFAULTS, "patch_size")),
        temporal_patch_size=_positive_int(
            path, "temporal_patch_size", _get(config, _QWEN_DEFAULTS, "temporal_patch_size")
        ),
        merge_size=_positive_int(path, "merge_size", _get(config, _QWEN_DEFAULTS, "merge_size")),
    )


def _size_dict(path: Path, key: str, value: object, *, default_to_square: bool) -> dict[str, Any]:
    # transformers' get_size_dict: an int is a square or a shortest edge, a pair is (h, w).
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, list | tuple) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, Mapping):
        return dict(value)
    raise ProcessorError(f"{path}: {key} has an unsupported form: {value!r}")


def _resize_spec(path: Path, config: Mapping[str, Any], kind: str, family: str) -> ProcessorSpec:
    defaults = _RESIZE_DEFAULTS[family]
    do_resize = bool(_get(config, defaults, "do_resize"))
    do_center_crop = bool(_get(config, defaults, "do_center_crop"))
    resize_hw: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop_hw: tuple[int, int] | None = None
    if do_center_crop:
        crop = _size_dict(path, "crop_size", _get(config, defaults, "crop_size"), default_to_square=True)
        crop_hw = (
            _positive_int(path, "crop_size.height", crop.get("height")),
            _positive_int(path, "crop_size.width", crop.get("width")),
        )
    if do_resize:
        # Both classes set default_to_square = False: an int size means the shortest edge.
        size = _size_dict(path, "size", _get(config, defaults, "size"), default_to_square=False)
        keys = {k for k, v in size.items() if v is not None}
        if keys == {"height", "width"}:
            resize_hw = (
                _positive_int(path, "size.height", size["height"]),
                _positive_int(path, "size.width", size["width"]),
            )
        elif keys == {"shortest_edge"}:
            shortest_edge = _positive_int(path, "size.shortest_edge", size["shortest_edge"])
        else:
            raise ProcessorError(f"{path}: size keys {sorted(keys)} are not supported for {kind}")
    return ProcessorSpec(
        family=family,
        processor_type=kind,
        do_resize=do_resize,
        resize_hw=resize_hw,
        shortest_edge=shortest_edge,
        crop_hw=crop_hw,
    )


# -- loading and running ---------------------------------------------------------------------------


class _DropPilFallback(logging.Filter):
    """Drops transformers' "requires torchvision ... falling back to ...Pil" notice, nothing else.

    Without torchvision the PIL class is the intended one here, so the notice is noise in the logs
    of every worker; every other transformers message still gets through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("falling back" in message.lower() and "pil" in message.lower())


# The loggers that emit that notice (the lazy-import fallback and the auto class's backend choice).
_FALLBACK_LOGGERS: Final[tuple[str, ...]] = (
    "transformers.utils.import_utils",
    "transformers.models.auto.image_processing_auto",
)


@contextmanager
def _quiet_pil_fallback() -> Iterator[None]:
    noise = _DropPilFallback()
    loggers = [logging.getLogger(name) for name in _FALLBACK_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def load_processor(name_or_dir: str) -> Any:
    """Build the PIL-backend image processor for a preset name or a config directory, offline."""
    directory = resolve_processor(name_or_dir)
    from transformers import AutoImageProcessor  # noqa: PLC0415 - heavy (torch): only where processors are built

    with _quiet_pil_fallback():
        # local_files_only: a sidecar never reaches the Hub, whatever HF_HUB_OFFLINE says.
        return AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            str(directory), backend="pil", local_files_only=True
        )


def run_processor(processor: Any, image: Image.Image, *, raw: bool = False) -> dict[str, np.ndarray]:
    """Every named output of ``processor`` for one image, as C-contiguous numpy arrays.

    ``return_tensors="np"`` is supported by the 5.x processors and avoids a torch round trip. The
    dtypes are float32 for ``pixel_values`` and int64 for ``image_grid_thw`` (what cost.py
    predicts). Errors the processor raises (such as Qwen2-VL's aspect-ratio limit) propagate
    unchanged; cost.py refuses those images before they get here.

    ``raw`` (``preprocess.transport_dtype: uint8``): the same call without rescaling and normalising,
    so ``pixel_values`` holds the resized pixels themselves, patchified exactly as the normalised ones
    would be; they are whole numbers in 0..255 (the resize runs on the uint8 image) and come back as
    uint8. `raw_normalisation` gives what the engine must apply to them.
    """
    if raw:
        outputs = processor(images=image, return_tensors="np", do_rescale=False, do_normalize=False)
    else:
        outputs = processor(images=image, return_tensors="np")
    arrays: dict[str, np.ndarray] = {}
    for name, value in outputs.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"processor output {name!r} is {type(value).__name__}, expected numpy.ndarray")
        array = value
        if raw and name == "pixel_values":
            array = value.astype(np.uint8)
            # The cast must be exact: a processor that resized in float would have fractions here.
            if not np.array_equal(array, value):
                raise ValueError("raw pixel_values are not whole numbers in 0..255: this processor cannot send uint8")
        # A no-op for the contiguous arrays the processors return; a copy only if a version changes that.
        arrays[name] = np.ascontiguousarray(array)
    return arrays


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` rounded to bfloat16, as the uint16 bit patterns the arena holds.

    The rounding is torch's ``Tensor.to(torch.bfloat16)`` (and what an engine does to float32
    pixel_values for a bfloat16 model): to nearest, ties to even; numpy has no bfloat16, so it is
    done on the bits. ``tests/test_bfloat16.py`` holds it to torch's, bit for bit, except NaN (here
    0x7FC0; torch's own scalar and vectorised casts disagree), which pixel values never are.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # The low 16 bits are dropped; adding 0x7FFF plus the kept part's lowest bit rounds half to even.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def raw_normalisation(processor: Any) -> dict[str, Any]:
    """The ``normalize`` of a uint8 part: how an engine turns `run_processor(..., raw=True)`'s pixels
    into the processor's own float32 (`preprocess.protocol.ImageNormalization`, transformers'
    arithmetic bit for bit). ValueError for a processor that does not both rescale and normalise."""
    norm = ImageNormalization.from_processor(processor, len(processor.image_mean))
    if norm is None:
        raise ValueError("this image processor does not rescale and normalise: it cannot send uint8 pixel_values")
    return norm.to_json()


# -- decoding ----------------------------------------------------------------------------------------


def decode(data: bytes) -> Image.Image:
    """Decode image bytes per the module's decode policy: frame 0, upright, RGB over white."""
    try:
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as opened:
            opened.load()  # frame 0; raises here on truncated or corrupt data
            image: Image.Image = opened
            # Transpose only when the tag asks for it: exif_transpose copies the whole image otherwise.
            if image.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except MemoryError:
        raise
    except Exception as exc:
        # PIL's plugins raise a zoo of types on hostile input (OSError, SyntaxError, struct.error,
        # IndexError, DecompressionBombError...); to callers they all mean "bad image".
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    # The exact test and arithmetic of transformers.image_transforms.convert_to_rgb, for parity.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image  # already what the processor wants: skip a full copy
    return image.convert("RGB")
