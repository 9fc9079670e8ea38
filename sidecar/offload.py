"""Offload mode: the sidecar preprocesses images itself and hands the engine tensors, not images.

For a multimodal request: admission reserves one arena extent per image (the gate's allocator is
the pipeline, so the byte budget is real memory); workers decode and preprocess each image
straight into its extent; every image part is rewritten into a tensor part

    {"type": "image_tensors", "tensors": {"pixel_values": <descriptor>, "image_grid_thw": <descriptor>}}

and the request goes to the engine's chat endpoint. The engine's response headers are the ack
(it sends them only after every rank copied its tensors): the lease, and with it the extents, is
released then, or on whatever else ends the request first. Extents are freed only once no worker
can still write into them (`preprocess.pipeline.ExtentHold`).

The reference engine speaks chat completions only, so in this mode Anthropic `/v1/messages`, OpenAI
`/v1/responses` and OpenAI `/v1/completions` requests are translated to chat form and the answers
translated back, streaming included (`translate/`); text requests on those routes too.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from preprocess.cost import output_shapes
from preprocess.pipeline import ImagePipeline, Processed
from preprocess.pool import PoolError, TaskFailed, TaskTimeout, WorkerUnavailable
from preprocess.processors import ProcessorSpec
from preprocess.sources import InlineImage

from .classify import Classification, MediaPart
from .errors import Cause, SidecarError
from .families import Route
from .metrics import Metrics
from .translate import (
    StreamTranslator,
    chat_stream_to_completions,
    chat_stream_to_messages,
    chat_stream_to_responses,
    chat_to_completions,
    chat_to_messages,
    chat_to_responses,
    completions_to_chat,
    messages_to_chat,
    responses_to_chat,
)
from .translate.answers import chat_error_to_messages, chat_error_to_responses
from .translate.completions import chat_error_to_completions

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class MessagesTransform:
    model: str
    message_id: str

    def stream(self) -> StreamTranslator:
        return chat_stream_to_messages(self.model, self.message_id)

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        return chat_to_messages(body)

    def error(self, status: int, payload: Any) -> dict[str, Any]:
        return chat_error_to_messages(status, payload)


@dataclass(frozen=True, slots=True)
class ResponsesTransform:
    request: dict[str, Any]
    response_id: str

    def stream(self) -> StreamTranslator:
        return chat_stream_to_responses(self.request, self.response_id)

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        return chat_to_responses(body, self.request)

    def error(self, status: int, payload: Any) -> dict[str, Any]:
        return chat_error_to_responses(status, payload)


@dataclass(frozen=True, slots=True)
class CompletionsTransform:
    model: str
    completion_id: str

    def stream(self) -> StreamTranslator:
        return chat_stream_to_completions(self.model, self.completion_id)

    def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        return chat_to_completions(body, self.model)

    def error(self, status: int, payload: Any) -> dict[str, Any]:
        return chat_error_to_completions(status, payload)


Transform = MessagesTransform | ResponsesTransform | CompletionsTransform


def to_chat(route: Route, data: dict[str, Any], found: Classification) -> tuple[dict[str, Any], Transform | None]:
    """The chat-completions request for the engine, and how to translate its answer back.

    The translators take each non-text part's chat form from the walk (`found`), so the engine gets
    only parts the sidecar checked, or produced itself.
    """
    from .translate import TranslationError  # noqa: PLC0415 - keeps the import list above readable

    try:
        if route.kind == "messages":
            chat = messages_to_chat(data, found.chat_part)
            return chat, MessagesTransform(str(data.get("model", "")), f"msg_{uuid.uuid4().hex}")
        if route.kind == "responses":
            return responses_to_chat(data, found.chat_part), ResponsesTransform(data, f"resp_{uuid.uuid4().hex}")
        if route.kind == "completions":  # no parts to take from the walk: prompts are text or refused
            chat = completions_to_chat(data)
            return chat, CompletionsTransform(str(data.get("model", "")), f"cmpl-{uuid.uuid4().hex}")
    except TranslationError as exc:
        raise SidecarError(Cause.BAD_REQUEST, str(exc), param=exc.param) from None
    return data, None


def check_offloadable(found: Classification) -> None:
    for part in found.parts:
        if part.media != "image" or not isinstance(part.source, InlineImage) or part.header is None:
            raise SidecarError(
                Cause.BAD_REQUEST,
                f"{part.path}: offload mode takes images sent inline (data URL, base64 or a fetched URL); "
                f"this {part.media} part cannot be preprocessed by the sidecar",
                param=part.path,
            )


async def preprocess_images(
    pipeline: ImagePipeline, holds: list[Any], parts: tuple[MediaPart, ...], spec: ProcessorSpec, metrics: Metrics
) -> None:
    """Run every image through the workers into its extent and rewrite its part into a tensor part."""

    async def one(part: MediaPart, hold: Any) -> Processed:
        assert isinstance(part.source, InlineImage) and part.header is not None  # check_offloadable
        expected = output_shapes(spec, *part.header.display_size)
        try:
            return await pipeline.process(hold, part.source.b64, expected)
        except TaskFailed as exc:
            raise SidecarError(
                Cause.BAD_IMAGE, f"{part.path}: cannot decode the image: {exc}", param=part.path
            ) from None
        except TaskTimeout as exc:
            raise SidecarError(Cause.PREPROCESS_FAILED, f"{part.path}: {exc}", param=part.path) from None
        except WorkerUnavailable as exc:
            # No worker could start (it retries with backoff): the request may succeed later.
            raise SidecarError(Cause.PREPROCESS_UNAVAILABLE, f"{part.path}: {exc}", param=part.path) from None
        except PoolError as exc:
            raise SidecarError(Cause.PREPROCESS_FAILED, f"{part.path}: preprocessing failed: {exc}") from None

    results = await asyncio.gather(*(one(p, h) for p, h in zip(parts, holds, strict=True)), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    for part, done in zip(parts, results, strict=True):
        assert isinstance(done, Processed)
        metrics.decode_seconds.observe(done.result.decode_s)
        metrics.preprocess_seconds.observe(done.result.preprocess_s)
        part.node.clear()
        part.node.update({"type": "image_tensors", "tensors": {n: d.to_json() for n, d in done.tensors.items()}})
        if done.result.normalize is not None:  # uint8 pixels: the engine normalises them (and checks this)
            part.node["normalize"] = done.result.normalize


async def verify_shared_memory(
    session: aiohttp.ClientSession, base: str, health_path: str, token: str, pixels: str = "float32"
) -> str | None:
    """None when the engine sees our /dev/shm and takes our `pixels` (preprocess.transport_dtype); else
    why not. Raises aiohttp/OS errors if unreachable."""
    async with session.get(base + health_path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
        body = await resp.json(content_type=None)
    shm = (body.get("shm") or {}) if isinstance(body, dict) else {}
    theirs = shm.get("token") if isinstance(shm, dict) else None
    if theirs is None:
        return "the engine's health answer has no shm.token: it does not speak the offload protocol"
    if theirs != token:
        return (
            f"the engine sees a different shared memory (its token {theirs!r}, ours {token!r}): "
            "run it in the same pod/host with the same /dev/shm mounted, or use upstream.mode: passthrough"
        )
    # An engine that lists no pixel dtypes predates the list: it takes float32 only.
    accepted = shm.get("pixels", ["float32"])
    if not isinstance(accepted, list) or pixels not in accepted:
        # vllm-engine takes one dtype, its --pixels (float32 or uint8); the reference engine all three.
        fix = f"mm-sidecar vllm-engine --pixels {pixels}" if pixels != "bfloat16" else "vllm-engine: float32 or uint8"
        return (
            f"the engine takes pixel_values as {accepted!r}, preprocess.transport_dtype is {pixels!r}: set the "
            f"same on both sides ({fix})"
        )
    return None
