"""vLLM 0.32 as an offload engine: a `vllm.general_plugins` plugin that makes vLLM's own OpenAI server
take the sidecar's `image_tensors` parts, without forking vLLM or replacing any of its processes.

Loaded through the entry point ``mm_sidecar_offload = engine.vllm_offload:register`` (pyproject.toml),
so vLLM calls `register()` in every process it starts. It does nothing unless
``MM_SIDECAR_VLLM_OFFLOAD=1`` (which `mm-sidecar vllm-engine` sets), so a vLLM that merely has the
project installed beside it is unchanged. It refuses to patch any vLLM but 0.32.x: the hooks touch
private code. Every hook runs in the API server process, where vLLM's renderer parses chat content and
runs the multimodal processor; EngineCore and the workers run unmodified vLLM code and never see a
descriptor (vLLM's own transport brings them the tensors, with TP > 1 too).

1. `vllm.renderers.chat_utils._parse_chat_message_content_part`: a part
   ``{"type": "image_tensors", "tensors": {"pixel_values": desc, "image_grid_thw": desc}}`` is parsed
   here. Each descriptor is checked (fields, segment, MAC, page table) while the messages are parsed,
   so every descriptor of a request is validated before any byte of any of them is read. The request's
   `AsyncMultiModalItemTracker` gets, as an "image" item, a coroutine that copies the tensors out of
   the arena; the tracker runs the items only once every part was parsed. The chat template sees
   ``{"type": "image"}``, as for an ``image_url`` part.
2. `Qwen2VLMultiModalDataParser._parse_image_data` (Qwen2.5-VL and Qwen3-VL use it too): the copied
   images become `OffloadedImageItems`, processed items whose data vLLM passes through to the model
   (`get_processor_data() == {}`), so the HF processor never runs for them. The prompt's
   ``<|image_pad|>`` is expanded from ``image_grid_thw`` by Qwen2-VL's own prompt updates, exactly as
   for an image vLLM processed itself: ``usage.prompt_tokens`` is the same by construction. They are
   not `DictEmbeddingItems`, which would need ``--enable-mm-embeds`` (raw embeddings from anyone).
3. `OpenAIServingChat.create_chat_completion`: a message whose content has no text part validates as
   OpenAI's own message type, whose lazy part iterator cannot hold an `image_tensors` part; such
   content is taken back from the request's raw body (`restore_tensor_parts`).
4. `OffloadHealthMiddleware` (``--middleware engine.vllm_offload.OffloadHealthMiddleware``): a healthy
   ``GET /health`` answers ``{"status": "ok", "shm": {"dir", "token"}}`` as the reference engine does,
   which the sidecar checks before it sends a descriptor. vLLM's own answer still decides the status.

The ack: vLLM sends a stream's response headers only after rendering, and rendering includes the copy
out of the arena, so the headers leave once every tensor sits in vLLM's own memory (the sidecar sends
offloaded requests as streams for that reason). Every refusal of a descriptor is a 400 whose message
is exactly `preprocess.protocol.DESCRIPTOR_ERROR`; the cause goes to this process's log only. A grid
that does not match its pixels, or pixels of the wrong dtype for the model's normalisation, is a 400
too (it would otherwise kill EngineCore in the encoder).

Pixels: vLLM 0.32 normalises Qwen2-VL pixels on the device by default (``mm_device_do_normalize``,
expecting raw uint8 patches). The sidecar sends either the processor's normalised float32
(``preprocess.transport_dtype: float32``; `vllm-engine --pixels float32` passes
``--no-mm-device-do-normalize``) or the raw uint8 patches (``uint8``, a quarter of the bytes;
`vllm-engine --pixels uint8` keeps vLLM's device normalisation, the path vLLM takes for the images it
processes itself). The expected dtype is derived from the model config, so the wrong combination is a
400, never pixels normalised twice or not at all. A uint8 part carries the normalisation it was made
for (``"normalize": {"rescale_factor", "image_mean", "image_std"}``); it must be the one vLLM applies
(its processor config), else the part is refused: a sidecar configured for another model's processor
would otherwise be normalised with the wrong constants, silently. The field is not covered by the
descriptors' MAC and need not be: it is checked against vLLM's own configuration, not trusted.
`/health` lists the dtype this vLLM takes (``shm.pixels``), and the sidecar checks it before offloading.

`MM_SIDECAR_VLLM_PROBE_LOG=path` (tests): every HF multimodal-processor call, every image-processor
``preprocess`` and every arena copy in this process appends a line to that file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

ENABLE_ENV = "MM_SIDECAR_VLLM_OFFLOAD"
SHM_DIR_ENV = "MM_SIDECAR_SHM_DIR"
PROBE_ENV = "MM_SIDECAR_VLLM_PROBE_LOG"
PIXELS_ENV = "MM_SIDECAR_VLLM_PIXELS"  # float32 | uint8: what vllm-engine set up (--pixels), for /health
PIXELS = ("float32", "uint8")
PLUGIN_NAME = "mm_sidecar_offload"  # the entry point's name, as VLLM_PLUGINS lists it
SUPPORTED_VLLM = "0.32."  # the hooks touch private vLLM code: tested against 0.32.0 only
TENSOR_NAMES = frozenset({"pixel_values", "image_grid_thw"})

log = logging.getLogger("mm_sidecar.vllm_offload")


class _State:
    """This process's plugin state: whether the hooks are in, the arena reader and its copy thread."""

    def __init__(self) -> None:
        self.registered = False
        self.register_lock = threading.Lock()
        # ArenaReader is not thread-safe: the parse (event loop) and the copy thread take turns.
        self.reader_lock = threading.Lock()
        self.reader: Any = None
        self.copy_pool: ThreadPoolExecutor | None = None
        self.items_cls: type | None = None


_state = _State()


class UnsupportedVLLM(RuntimeError):
    """The installed vLLM is not one these hooks were written and tested against."""


def check_vllm_version(version: str) -> None:
    """Raise UnsupportedVLLM unless `version` is a vLLM 0.32.x."""
    if not version.startswith(SUPPORTED_VLLM):
        raise UnsupportedVLLM(
            f"mm-sidecar's vLLM offload plugin supports vLLM {SUPPORTED_VLLM}x only (it patches private "
            f"code); this is vLLM {version}. Install vllm 0.32, or unset {ENABLE_ENV} to run vLLM "
            "without offload (passthrough mode)"
        )


def _probe(event: str) -> None:
    path = os.environ.get(PROBE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.6f} pid={os.getpid()} {event}\n")


def shm_dir() -> str:
    return os.environ.get(SHM_DIR_ENV, "/dev/shm")


def pixels() -> str:
    """The pixel dtype this vLLM takes, as vllm-engine set it up (--pixels)."""
    value = os.environ.get(PIXELS_ENV, "float32")
    return value if value in PIXELS else "float32"


def _get_reader() -> Any:
    if _state.reader is None:
        from preprocess.protocol import ArenaReader  # noqa: PLC0415

        _state.reader = ArenaReader(shm_dir())
    return _state.reader


def _pool() -> ThreadPoolExecutor:
    # One thread copies out of the arena: a 50 MB copy (~3 ms) must not run on the event loop.
    if _state.copy_pool is None:
        _state.copy_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mm-sidecar-arena-copy")
    return _state.copy_pool


# ------------------------------------------------------------------------------------ the items


class OffloadedImage:
    """One image's processor outputs, already copied out of the arena (vLLM's own memory).

    Only this module makes them: no JSON, pickle or client payload turns into one, so the data parser
    tells offloaded images from everything else by type.
    """

    __slots__ = ("image_grid_thw", "pixel_values")

    def __init__(self, pixel_values: Any, image_grid_thw: Any) -> None:
        self.pixel_values = pixel_values
        self.image_grid_thw = image_grid_thw


def items_class() -> type:
    """`OffloadedImageItems`, a subclass of vLLM's `ModalityDataItems` (built on first use: vLLM is
    imported only inside vLLM's processes)."""
    if _state.items_cls is not None:
        return _state.items_cls
    from vllm.multimodal.parse import ModalityDataItems  # noqa: PLC0415

    class OffloadedImageItems(ModalityDataItems):  # type: ignore[misc]
        """Processed image items: passed through to the model, never to the HF processor.

        They count against ``--limit-mm-per-prompt`` like any image. The model's own
        `_get_mm_fields_config` splits the passthrough data into items, as it does for the HF
        processor's output.
        """

        def __init__(self, images: list[OffloadedImage]) -> None:
            import torch  # noqa: PLC0415

            # One image: its tensor as copied, no further copy. Several: concatenated in message order.
            pixel_values = images[0].pixel_values if len(images) == 1 else torch.cat([im.pixel_values for im in images])
            grid = torch.stack([im.image_grid_thw for im in images])
            super().__init__({"pixel_values": pixel_values, "image_grid_thw": grid}, "image")
            self._images = images

        def get_count(self) -> int:
            return len(self._images)

        def get(self, index: int) -> dict[str, Any]:
            # What the hasher hashes (the mm hash keys the prefix and encoder caches): this image's tensors.
            image = self._images[index]
            return {"pixel_values": image.pixel_values, "image_grid_thw": image.image_grid_thw}

        def get_processor_data(self) -> dict[str, object]:
            return {}  # nothing for the HF processor: vLLM then skips the call

        def get_passthrough_data(self) -> dict[str, object]:
            data: dict[str, object] = self.data
            return data

    _state.items_cls = OffloadedImageItems
    return OffloadedImageItems


# ------------------------------------------------------------------------------------ the part


def _descriptors(part: dict[str, Any]) -> dict[str, Any]:
    """Parse and validate (fields, segment, MAC, page table) every descriptor of one part; read nothing."""
    from preprocess.protocol import DescriptorError, TensorDescriptor  # noqa: PLC0415

    tensors = part.get("tensors")
    if not isinstance(tensors, dict) or set(tensors) != TENSOR_NAMES:
        raise DescriptorError(f"image_tensors.tensors must name exactly {sorted(TENSOR_NAMES)}")
    descs = {name: TensorDescriptor.from_json(obj) for name, obj in tensors.items()}
    pv, grid = descs["pixel_values"], descs["image_grid_thw"]
    if len(pv.shape) != 2 or grid.dtype != "int64" or grid.shape not in ((1, 3), (3,)):
        raise DescriptorError(f"image_tensors: pixel_values {pv.shape}, image_grid_thw {grid.dtype} {grid.shape}")
    with _state.reader_lock:
        reader = _get_reader()
        for desc in descs.values():
            reader.validate(desc)
    return descs


def copy_out(descs: dict[str, Any], expect: dict[str, Any]) -> OffloadedImage:
    """In the copy thread: copy both tensors into fresh memory, each extent re-checked after its copy;
    then check the grid against the pixels and the model."""
    import torch  # noqa: PLC0415

    started = time.perf_counter()
    with _state.reader_lock:
        reader = _get_reader()
        # Every descriptor again before reading any: the extent may have been freed since the parse.
        for desc in descs.values():
            reader.validate(desc)
        pixel_values = reader.copy_out(descs["pixel_values"])
        grid = reader.copy_out(descs["image_grid_thw"]).reshape(3)
    t, h, w = (int(v) for v in grid)
    merge = expect["merge"]
    # Authentic descriptors come from the sidecar, but a wrong grid would kill EngineCore (a DoS): check.
    if (
        min(t, h, w) < 1
        or h % merge
        or w % merge
        or t * h * w != pixel_values.shape[0]
        or pixel_values.shape[1] != expect["patch_dim"]
        or str(pixel_values.dtype).removeprefix("torch.") != expect["dtype"]
    ):
        raise ValueError(
            f"image_tensors: pixel_values {pixel_values.dtype} {list(pixel_values.shape)} do not match "
            f"image_grid_thw {[t, h, w]} for this model (patch dim {expect['patch_dim']}, merge {merge}, "
            f"dtype {expect['dtype']})"
        )
    _probe(
        f"arena_copy pixel_values={list(pixel_values.shape)} grid={[t, h, w]} "
        f"nbytes={pixel_values.numel() * pixel_values.element_size()} ms={1e3 * (time.perf_counter() - started):.2f}"
    )
    return OffloadedImage(pixel_values, torch.tensor([t, h, w], dtype=torch.int64))


_EXPECT: dict[int, dict[str, Any]] = {}


def expectations(model_config: Any) -> dict[str, Any]:
    """What this model's offloaded pixels must look like: patch dim, spatial merge, dtype."""
    cached = _EXPECT.get(id(model_config))
    if cached is not None:
        return cached
    vision = model_config.hf_config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    fused = bool(getattr(model_config.multimodal_config, "mm_device_do_normalize", False))
    # With mm_device_do_normalize the model normalises on the device, expecting raw uint8 patches;
    # float pixels (already normalised by the sidecar) would be normalised twice.
    expect: dict[str, Any] = {
        "patch_dim": patch_dim,
        "merge": vision.spatial_merge_size,
        "dtype": "uint8" if fused else "float32",
        "normalize": None,
    }
    if fused:
        from vllm.model_executor.layers.fusion.mm_input_norm import _load_norm_params  # noqa: PLC0415

        norm = _load_norm_params(model_config)
        expect["normalize"] = {
            "rescale_factor": norm.rescale_factor,
            "image_mean": list(norm.image_mean),
            "image_std": list(norm.image_std),
        }
    _EXPECT[id(model_config)] = expect
    return expect


def check_normalize(part: dict[str, Any], dtype: str, expect: dict[str, Any]) -> None:
    """A uint8 part's `normalize` must be the normalisation vLLM applies on the device, a float32
    part must carry none (`protocol.check_normalize`; ValueError: a 400 naming the difference)."""
    from preprocess.protocol import ImageNormalization  # noqa: PLC0415
    from preprocess.protocol import check_normalize as check  # noqa: PLC0415

    ours = expect.get("normalize")
    own = None if ours is None else ImageNormalization.from_json(ours, "vLLM's normalisation")
    why = "this vLLM does not normalise on the device (mm_device_do_normalize is off)"
    check(part.get("normalize"), dtype, own, "image_tensors.normalize", why)


def _refused(exc: Any) -> Any:
    """A DescriptorError with the cause logged and no chain: its str() (what vLLM answers) is the fixed message."""
    from preprocess.protocol import DescriptorError  # noqa: PLC0415

    log.warning("refused a tensor descriptor: %s", exc.detail)
    return DescriptorError(exc.detail)


def _patch_chat_utils() -> None:
    import vllm.renderers.chat_utils as cu  # noqa: PLC0415

    original = cu._parse_chat_message_content_part

    def parse_part(part: Any, mm_parser: Any, *, wrap_dicts: bool, interleave_strings: bool) -> Any:
        if not (isinstance(part, dict) and part.get("type") == "image_tensors"):
            return original(part, mm_parser, wrap_dicts=wrap_dicts, interleave_strings=interleave_strings)
        from preprocess.protocol import DescriptorError  # noqa: PLC0415

        if not isinstance(mm_parser, cu.AsyncMultiModalContentParser):
            # The sync tracker resolves items as they come: it could read one part before validating the next.
            raise ValueError("image_tensors parts are accepted by the OpenAI server only")
        try:
            descs = _descriptors(part)
        except DescriptorError as exc:
            raise _refused(exc) from None
        expect = expectations(mm_parser.model_config)
        check_normalize(part, descs["pixel_values"].dtype, expect)

        async def copy_item() -> tuple[OffloadedImage, None]:
            loop = asyncio.get_running_loop()
            try:
                image = await loop.run_in_executor(_pool(), copy_out, descs, expect)
            except DescriptorError as exc:
                raise _refused(exc) from None
            return image, None  # no uuid: vLLM hashes the tensors themselves

        placeholder = mm_parser._tracker.add("image", copy_item)
        mm_parser._add_placeholder("image", placeholder)
        if wrap_dicts:
            return {"type": "image"}
        return cu.MODALITY_PLACEHOLDERS_MAP["image"] if interleave_strings else None

    cu._parse_chat_message_content_part = parse_part


def restore_tensor_parts(request: Any, body: bytes) -> None:
    """Give each message with `image_tensors` parts its content as sent, from the request's raw body.

    vLLM validates `messages` against a union. A user message whose content has no text part (only
    images, for instance) validates as OpenAI's own message type, whose content is a lazy iterable
    of OpenAI's part types: iterating it fails on an `image_tensors` part (a pydantic error, not our
    400). With a text part, vLLM's own message type wins and keeps the parts as dicts. Either way the
    parts reach the parser as the client wrote them: every one of them is checked there.
    """
    if b'"image_tensors"' not in body:
        return
    raw = json.loads(body)
    messages = raw.get("messages") if isinstance(raw, dict) else None
    if not isinstance(messages, list) or len(messages) != len(request.messages):
        return
    for parsed, sent in zip(request.messages, messages, strict=True):
        content = sent.get("content") if isinstance(sent, dict) else None
        if (
            isinstance(parsed, dict)
            and isinstance(content, list)
            and any(isinstance(part, dict) and part.get("type") == "image_tensors" for part in content)
        ):
            parsed["content"] = content


def _patch_serving_chat() -> None:
    from vllm.entrypoints.openai.chat_completion import serving  # noqa: PLC0415

    original = serving.OpenAIServingChat.create_chat_completion

    async def create_chat_completion(self: Any, request: Any, raw_request: Any = None) -> Any:
        if raw_request is not None:
            restore_tensor_parts(request, await raw_request.body())  # FastAPI read it: cached, no I/O
        return await original(self, request, raw_request)

    serving.OpenAIServingChat.create_chat_completion = create_chat_completion


def parse_image_data(original: Any) -> Any:
    """The Qwen2-VL data parser's `_parse_image_data`, taking lists of `OffloadedImage` as well."""

    def parse(self: Any, data: Any) -> Any:
        items = data if isinstance(data, list) else [data]
        if items and any(isinstance(item, OffloadedImage) for item in items):
            if not all(isinstance(item, OffloadedImage) for item in items):
                raise ValueError("image_tensors parts and images cannot be mixed in one request")
            return items_class()(items)
        return original(self, data)

    return parse


def _patch_qwen2vl_parser() -> None:
    from vllm.model_executor.models import qwen2_vl  # noqa: PLC0415

    parser = qwen2_vl.Qwen2VLMultiModalDataParser
    parser._parse_image_data = parse_image_data(parser._parse_image_data)


def _patch_probe() -> None:
    from vllm.multimodal.processing import context  # noqa: PLC0415

    original = context.InputProcessingContext.call_hf_processor

    def call_hf_processor(self: Any, hf_processor: Any, data: Any, kwargs: Any = None) -> Any:
        _probe(f"call_hf_processor {type(hf_processor).__name__} keys={sorted(data)}")
        return original(self, hf_processor, data, {} if kwargs is None else kwargs)

    context.InputProcessingContext.call_hf_processor = call_hf_processor
    from transformers.models.qwen2_vl import image_processing_qwen2_vl  # noqa: PLC0415

    classes: list[tuple[type, str]] = [(image_processing_qwen2_vl.Qwen2VLImageProcessor, "image_processor.preprocess")]
    try:
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl  # noqa: PLC0415
    except ImportError:
        pass
    else:
        classes.append((image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil, "image_processor_pil.preprocess"))
    for cls, event in classes:
        setattr(cls, "preprocess", _counted(getattr(cls, "preprocess"), event))  # noqa: B009, B010 - a method


def _counted(method: Any, event: str) -> Any:
    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        _probe(event)
        return method(self, *args, **kwargs)

    return counted


def register() -> None:
    """`vllm.general_plugins` entry point: runs in every vLLM process, possibly more than once.

    Inert unless MM_SIDECAR_VLLM_OFFLOAD=1; then raises UnsupportedVLLM (vLLM does not start) unless
    this is vLLM 0.32.x.
    """
    if os.environ.get(ENABLE_ENV) != "1":
        return
    with _state.register_lock:
        if _state.registered:
            return
        import vllm  # noqa: PLC0415

        check_vllm_version(str(vllm.__version__))
        _patch_serving_chat()
        _patch_chat_utils()
        _patch_qwen2vl_parser()
        if os.environ.get(PROBE_ENV):
            _patch_probe()
        _state.registered = True
    log.info("mm-sidecar offload: image_tensors parts accepted (arena directory %s)", shm_dir())
    _probe("registered")


# ------------------------------------------------------------------------------------ /health


class OffloadHealthMiddleware:
    """ASGI middleware: a healthy ``GET /health`` carries the shared-memory token of the offload protocol.

    vLLM's /health still decides (it checks EngineCore); its 200 gets the protocol's body. Building it
    also calls `register()`: every API-server process builds the app (``--api-server-count`` > 1), so
    the hooks are in place wherever requests are parsed, whatever VLLM_PLUGINS says.
    """

    def __init__(self, app: Any) -> None:
        from preprocess.protocol import shm_token  # noqa: PLC0415

        register()
        self.app = app
        shm = {"dir": shm_dir(), "token": shm_token(shm_dir()), "pixels": [pixels()]}
        self.body = json.dumps({"status": "ok", "shm": shm}).encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != "/health" or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        status = start.get("status", 500)
        body = self.body if status == 200 else b"".join(chunks)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
