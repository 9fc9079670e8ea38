"""Rank 0's OpenAI-compatible HTTP server: `/v1/chat/completions` (streaming and not), `/v1/models`, `/health`.

Two forms of image part:
- inline (`image_url` with a data URL): rank 0 decodes and preprocesses it itself, in its API
  process, as vLLM and LMDeploy do, then broadcasts the tensors to the other ranks. This is the
  baseline the benchmarks compare the sidecar against.
- `{"type": "image_tensors", "tensors": {name: descriptor}}` from the sidecar: only descriptors
  travel; every rank copies its tensors out of shared memory (`ranks.Copy`), and the response
  headers, sent only after every rank has done so, are the ack. Every bad, forged or stale
  descriptor, whether refused while parsing or by a rank, is answered 400 with exactly
  `DESCRIPTOR_ERROR` and nothing else: this port is reachable from anything in the pod's network
  namespace, and the cause (bounds, segment names, generations, other files) describes the arena.
  The cause goes to the log, one line.

A part's `pixel_values` are the processor's normalised float32 (or those rounded to bfloat16, the
sidecar's `preprocess.transport_dtype: bfloat16`, cast to the model's dtype like float32 ones) or its raw uint8 patches
(the sidecar's `preprocess.transport_dtype: uint8`), which every rank normalises itself in
`VLModel.build_inputs`. A uint8 part must carry `"normalize": {"rescale_factor", "image_mean",
"image_std"}`, the normalisation it was made for, and it must equal this model's own (its image
processor's) exactly, float for float; a float32 part must not carry one (are its pixels normalised
already or not?). Anything else is a 400 that names the part, before any tensor is handed off: a
sidecar set up for another model's processor would otherwise be normalised with the wrong constants,
silently. `/health` lists the dtypes taken (`shm.pixels`), which the sidecar checks before offloading.

Model commands run one at a time on a single model thread (ranks must execute them in the same
order), so the event loop stays free to accept requests and answer `/health`.

Streaming: the model thread hands each token id to the event loop as rank 0 picks it
(`loop.call_soon_threadsafe` onto a queue, ranks.py `on_token`), and the handler writes its SSE chunk
then, so the first chunk leaves after the first token, not after the last: a proxy that acks at the
first chunk (the sidecar's passthrough mode) sees the real time to first token. The role chunk goes
with the first token; the headers (the ack of the handoff) went before generation started.
Non-streaming answers are written once, when generation is over.

`max_tokens` and `max_completion_tokens` must be integers >= 1 when present (JSON null is absent: 16
tokens); anything else is a 400 naming the field and the value, before any image is handed off.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import torch
from aiohttp import web

from preprocess.processors import decode, load_processor, run_processor
from preprocess.procmem import tree_memory
from preprocess.protocol import DESCRIPTOR_ERROR, DescriptorError, TensorDescriptor, check_normalize, shm_token

from .model import ImageNormalization, VLModel
from .ranks import Broadcast, Copy, Drop, Generate, Generated, HandoffError, Rank, Stop

RANK = web.AppKey("rank", Rank)
MODEL_THREAD = web.AppKey("model_thread", ThreadPoolExecutor)
SETTINGS = web.AppKey("settings", dict)

DEFAULT_MAX_TOKENS = 16
_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")  # the first one present wins, as before

log = logging.getLogger("mm_engine.server")


class _BadField(ValueError):
    """A body field whose value the engine refuses; `param` names it in the answer, as OpenAI's does."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _error(
    status: int,
    message: str,
    etype: str = "invalid_request_error",
    code: str | None = None,
    *,
    param: str | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _max_tokens(body: dict[str, Any]) -> int:
    """How many tokens to generate at most. Every limit field present must be an integer >= 1: a
    bool, a float (even 16.0) or a string is refused, not converted."""
    chosen: int | None = None
    for name in _LIMIT_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadField(name, f"{name} must be an integer >= 1, got {_shown(value)}")
        if chosen is None:
            chosen = value
    return DEFAULT_MAX_TOKENS if chosen is None else chosen


def _shown(value: Any) -> str:
    """A refused value as the client wrote it (JSON), cut short: a message is not an echo service."""
    try:
        text = orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _descriptor_refused() -> web.Response:
    """The one answer to every refused descriptor: the same bytes whatever the cause."""
    return _error(400, DESCRIPTOR_ERROR, code="invalid_tensor_descriptor")


async def _model(app: web.Application, command: Any, tensors: Any = None) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(app[MODEL_THREAD], app[RANK].issue, command, tensors)


def _check_normalize(
    part: dict[str, Any], descriptors: dict[str, TensorDescriptor], own: ImageNormalization | None, where: str
) -> None:
    """A part's `normalize` against its pixel_values' dtype and this model's normalisation (`own`):
    `protocol.check_normalize`, answered as a 400 naming the field."""
    field = f"{where}.normalize"
    pixels = descriptors.get("pixel_values")
    try:
        check_normalize(
            part.get("normalize"),
            None if pixels is None else pixels.dtype,
            own,
            field,
            "this model's image processor does not rescale and normalise",
        )
    except ValueError as exc:
        raise _BadField(field, str(exc)) from None


def _split_images(
    messages: Any, normalization: ImageNormalization | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """Messages with every image part replaced by {"type": "image"}, and the images in order.

    `normalization`: the model's, which a uint8 part's `normalize` must equal (`_check_normalize`)."""
    if not isinstance(messages, list):
        raise ValueError("messages: must be an array")
    out: list[dict[str, Any]] = []
    images: list[tuple[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}]: must be an object")
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts: list[Any] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_tensors":
                tensors = part.get("tensors")
                if not isinstance(tensors, dict) or not tensors:
                    raise DescriptorError(f"messages[{i}].content[{j}].tensors: must be a non-empty object")
                try:
                    descriptors = {n: TensorDescriptor.from_json(d) for n, d in tensors.items()}
                except DescriptorError as exc:
                    raise DescriptorError(f"messages[{i}].content[{j}]: {exc.detail}") from None
                _check_normalize(part, descriptors, normalization, f"messages[{i}].content[{j}]")
                images.append(("tensors", descriptors))
                parts.append({"type": "image"})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url[:200]:
                    raise ValueError(f"messages[{i}].content[{j}]: only base64 data URLs are accepted")
                images.append(("inline", url.split(",", 1)[1]))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images


def _preprocess_inline(processor: Any, b64: str) -> dict[str, torch.Tensor]:
    data = binascii.a2b_base64(b64.encode("ascii"), strict_mode=True)
    outputs = run_processor(processor, decode(data))
    return {name: torch.from_numpy(array) for name, array in outputs.items()}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    try:
        body = orjson.loads(await request.read())
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        messages, images = _split_images(body.get("messages"), app[SETTINGS]["normalization"])
        max_tokens = _max_tokens(body)
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise _BadField("stream_options", "stream_options must be an object")
    except DescriptorError as exc:  # before ValueError, its base: never str(exc) plus a location
        log.warning("refused a tensor descriptor: %s", exc.detail)
        return _descriptor_refused()
    except _BadField as exc:
        return _error(400, str(exc), code="invalid_value", param=exc.param)
    except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
        return _error(400, str(exc))
    stream = bool(body.get("stream"))
    request_id = f"chatcmpl-{uuid.uuid4().hex[:16]}"
    headers: dict[str, str] = {}

    descriptors = [d for kind, d in images if kind == "tensors"]
    inline = [d for kind, d in images if kind == "inline"]
    if descriptors and inline:
        return _error(400, "mix of inline images and image_tensors parts in one request is not supported")
    try:
        if descriptors:
            sums = await _model(app, Copy(request_id, descriptors, app[SETTINGS]["checksums"]))
            if app[SETTINGS]["checksums"]:
                headers["x-mm-tensor-sha256"] = orjson.dumps(sums).decode()
        elif inline:
            processor = app[SETTINGS]["processor"]
            tensors = [await asyncio.to_thread(_preprocess_inline, processor, b64) for b64 in inline]
            layout = [
                {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in im.items()} for im in tensors
            ]
            await _model(app, Broadcast(request_id, layout), tensors)
    except HandoffError as exc:
        if exc.refused:  # each rank logged its own cause
            return _descriptor_refused()
        return _error(exc.status, f"tensor handoff failed: {exc}", code="handoff_failed")
    except DescriptorError as exc:  # the ranks turn theirs into HandoffError; this is only the backstop
        log.warning("refused a tensor descriptor: %s", exc.detail)
        return _descriptor_refused()
    except (ValueError, binascii.Error, OSError) as exc:
        return _error(400, f"bad image: {exc}")

    model_name = app[SETTINGS]["model_name"]
    created = int(time.time())
    # The headers now go out: the ack. Every rank holds its own copy of the tensors.
    response = web.StreamResponse(headers=headers)
    response.content_type = "text/event-stream" if stream else "application/json"
    try:
        await response.prepare(request)
    except BaseException:
        # The client is gone before the ack: no Generate will consume what every rank staged.
        await asyncio.shield(_model(app, Drop(request_id)))
        raise
    base = {"id": request_id, "created": created, "model": model_name}
    command = Generate(request_id, messages, max_tokens)
    if stream:
        return await _stream_answer(app, response, command, base, bool(stream_options.get("include_usage")))
    try:
        generated: Generated = await _model(app, command)
    except Exception as exc:  # the status line is gone: report in the body
        return await _generation_failed(app, response, request_id, exc, stream=False)
    model = app[RANK].model
    tokens = generated.tokens
    message = {"role": "assistant", "content": model.decode(tokens)}
    choice = {"index": 0, "message": message, "finish_reason": _finish(model, tokens), "logprobs": None}
    answer = {**base, "object": "chat.completion", "choices": [choice], "usage": _usage(generated)}
    await response.write(orjson.dumps(answer))
    await response.write_eof()
    return response


def _finish(model: VLModel, tokens: list[int]) -> str:
    return "stop" if tokens and tokens[-1] in model.stop_ids else "length"


def _usage(generated: Generated) -> dict[str, int]:
    prompt, completion = generated.prompt_tokens, len(generated.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _generation_failed(
    app: web.Application, response: web.StreamResponse, request_id: str, exc: Exception, *, stream: bool
) -> web.StreamResponse:
    """After the headers: the error goes in the body (in-band, as an SSE event, when streaming)."""
    await _model(app, Drop(request_id))
    error = {"error": {"message": f"generation failed: {exc}", "type": "server_error", "code": None}}
    await response.write((b"data: " if stream else b"") + orjson.dumps(error) + (b"\n\n" if stream else b""))
    await response.write_eof()
    return response


async def _stream_answer(
    app: web.Application,
    response: web.StreamResponse,
    command: Generate,
    base: dict[str, Any],
    include_usage: bool,
) -> web.StreamResponse:
    """Generate on the model thread and write each token's chunk as soon as the thread hands it over."""
    loop = asyncio.get_running_loop()
    feed: asyncio.Queue[int | None] = asyncio.Queue()

    def on_token(token: int) -> None:  # on the model thread, between two decoding steps
        loop.call_soon_threadsafe(feed.put_nowait, token)

    job: asyncio.Future[Generated] = loop.run_in_executor(
        app[MODEL_THREAD], functools.partial(app[RANK].issue, command, on_token=on_token)
    )
    # The job's result reaches the loop by call_soon_threadsafe too, from the same thread and after
    # every token it handed over: the None lands behind the last of them.
    job.add_done_callback(lambda _: feed.put_nowait(None))

    try:
        return await _write_stream(app, response, command, base, include_usage=include_usage, job=job, feed=feed)
    except ConnectionResetError:
        # Routine for a stream (a client that stops reading); the generation runs on to its end on
        # the model thread, as it must on every rank, and its tokens are dropped.
        log.info("%s: the client left mid-stream", command.request)
        job.add_done_callback(functools.partial(_log_unheard_failure, command.request))
        return response


def _log_unheard_failure(request_id: str, job: asyncio.Future[Generated]) -> None:
    """A generation whose client had left: nobody awaits it, so its failure is logged here."""
    if not job.cancelled() and (exc := job.exception()) is not None:
        log.warning("%s: generation failed after the client left: %s", request_id, exc)


async def _write_stream(
    app: web.Application,
    response: web.StreamResponse,
    command: Generate,
    base: dict[str, Any],
    *,
    include_usage: bool,
    job: asyncio.Future[Generated],
    feed: asyncio.Queue[int | None],
) -> web.StreamResponse:
    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return b"data: " + orjson.dumps({**base, "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"

    model = app[RANK].model
    streamed: list[int] = []
    sent = ""
    while (token := await feed.get()) is not None:
        if not streamed:
            await response.write(chunk({"role": "assistant", "content": ""}, None))
        streamed.append(token)
        # Byte-level BPE: one token may be half a character. Decode the prefix and send what is
        # new once it is whole, as streaming detokenizers do.
        text = model.decode(streamed)
        if len(text) > len(sent) and not text.endswith("\ufffd"):
            await response.write(chunk({"content": text[len(sent) :]}, None))
            sent = text
    try:
        generated = await job
    except Exception as exc:
        return await _generation_failed(app, response, command.request, exc, stream=True)
    if not streamed:
        await response.write(chunk({"role": "assistant", "content": ""}, None))
    # What is still held back (a last half character), from the returned ids: they are the answer.
    text = model.decode(generated.tokens)
    if len(text) > len(sent):
        await response.write(chunk({"content": text[len(sent) :]}, None))
    await response.write(chunk({}, _finish(model, generated.tokens)))
    if include_usage:
        usage_chunk = {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(generated)}
        await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    # The launcher's tree: every rank (benchmarks and `mm-sidecar demo` read the engine's memory here).
    memory = tree_memory(os.getppid())
    return web.json_response(
        {
            "status": "ok",
            "model": settings["model_name"],
            # pixels: the pixel_values dtypes taken (the sidecar checks its preprocess.transport_dtype).
            "shm": {"dir": settings["shm_dir"], "token": settings["token"], "pixels": settings["pixels"]},
            "memory": {"processes": memory.processes, "rss_bytes": memory.rss_bytes, "pss_bytes": memory.pss_bytes},
        }
    )


async def models(request: web.Request) -> web.Response:
    name = request.app[SETTINGS]["model_name"]
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "mm-sidecar"}]})


def create_engine_app(rank: Rank, *, model_dir: str, shm_dir: str, checksums: bool) -> web.Application:
    processor = load_processor(model_dir)
    # uint8 parts are checked against the model's normalisation, which is what build_inputs applies; it
    # must be this processor's too, or the inline path and the uint8 path would disagree.
    normalization = rank.model.normalization
    served = ImageNormalization.from_processor(processor, rank.model.image_channels)
    if normalization != served:
        raise ValueError(
            f"{model_dir}: the image processor's normalisation {served} is not the model's {normalization}"
        )
    app = web.Application(client_max_size=1 << 30)
    app[RANK] = rank
    app[MODEL_THREAD] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    app[SETTINGS] = {
        "model_name": rank.model.model_name,
        "processor": processor,
        "normalization": normalization,
        # bfloat16 pixels are cast to the model's dtype like float32 ones (build_inputs).
        "pixels": ["float32", "bfloat16"] + ([] if normalization is None else ["uint8"]),
        "shm_dir": shm_dir,
        "token": shm_token(shm_dir),
        "checksums": checksums,
    }

    async def stop_ranks(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(app[MODEL_THREAD], rank.issue, Stop())
        app[MODEL_THREAD].shutdown(wait=True)
        rank.reader.close()

    app.on_cleanup.append(stop_ranks)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
