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

Model commands run one at a time on a single model thread (ranks must execute them in the same
order), so the event loop stays free to accept requests and answer `/health`.
"""

from __future__ import annotations

import asyncio
import binascii
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
from preprocess.protocol import DESCRIPTOR_ERROR, DescriptorError, TensorDescriptor, shm_token

from .ranks import Broadcast, Copy, Drop, Generate, Generated, HandoffError, Rank, Stop

RANK = web.AppKey("rank", Rank)
MODEL_THREAD = web.AppKey("model_thread", ThreadPoolExecutor)
SETTINGS = web.AppKey("settings", dict)

log = logging.getLogger("mm_engine.server")


def _error(status: int, message: str, etype: str = "invalid_request_error", code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _descriptor_refused() -> web.Response:
    """The one answer to every refused descriptor: the same bytes whatever the cause."""
    return _error(400, DESCRIPTOR_ERROR, code="invalid_tensor_descriptor")


async def _model(app: web.Application, command: Any, tensors: Any = None) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(app[MODEL_THREAD], app[RANK].issue, command, tensors)


def _split_images(messages: Any) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """Messages with every image part replaced by {"type": "image"}, and the images in order."""
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
                    images.append(("tensors", {n: TensorDescriptor.from_json(d) for n, d in tensors.items()}))
                except DescriptorError as exc:
                    raise DescriptorError(f"messages[{i}].content[{j}]: {exc.detail}") from None
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
        messages, images = _split_images(body.get("messages"))
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if max_tokens < 1:
            raise ValueError("max_tokens: must be >= 1")
    except DescriptorError as exc:  # before ValueError, its base: never str(exc) plus a location
        log.warning("refused a tensor descriptor: %s", exc.detail)
        return _descriptor_refused()
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
    try:
        generated: Generated = await _model(app, Generate(request_id, messages, max_tokens))
    except Exception as exc:  # the status line is gone: report in the body
        await _model(app, Drop(request_id))
        error = {"error": {"message": f"generation failed: {exc}", "type": "server_error", "code": None}}
        await response.write((b"data: " if stream else b"") + orjson.dumps(error) + (b"\n\n" if stream else b""))
        await response.write_eof()
        return response
    model = app[RANK].model
    tokens, prompt = generated.tokens, generated.prompt_tokens
    finish = "stop" if tokens and tokens[-1] in model.stop_ids else "length"
    usage = {"prompt_tokens": prompt, "completion_tokens": len(tokens), "total_tokens": prompt + len(tokens)}
    base = {"id": request_id, "created": created, "model": model_name}
    if not stream:
        message = {"role": "assistant", "content": model.decode(tokens)}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        await response.write(orjson.dumps({**base, "object": "chat.completion", "choices": [choice], "usage": usage}))
        await response.write_eof()
        return response

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return b"data: " + orjson.dumps({**base, "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"

    await response.write(chunk({"role": "assistant", "content": ""}, None))
    sent = ""
    for i in range(1, len(tokens) + 1):
        # Byte-level BPE: one token may be half a character. Decode the prefix and send what is
        # new once it is whole, as streaming detokenizers do.
        text = model.decode(tokens[:i])
        if len(text) > len(sent) and not text.endswith("\ufffd"):
            await response.write(chunk({"content": text[len(sent) :]}, None))
            sent = text
    if len(model.decode(tokens)) > len(sent):
        await response.write(chunk({"content": model.decode(tokens)[len(sent) :]}, None))
    await response.write(chunk({}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage_chunk = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
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
            "shm": {"dir": settings["shm_dir"], "token": settings["token"]},
            "memory": {"processes": memory.processes, "rss_bytes": memory.rss_bytes, "pss_bytes": memory.pss_bytes},
        }
    )


async def models(request: web.Request) -> web.Response:
    name = request.app[SETTINGS]["model_name"]
    return web.json_response({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "mm-sidecar"}]})


def create_engine_app(rank: Rank, *, model_dir: str, shm_dir: str, checksums: bool) -> web.Application:
    app = web.Application(client_max_size=1 << 30)
    app[RANK] = rank
    app[MODEL_THREAD] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    app[SETTINGS] = {
        "model_name": rank.model.model_name,
        "processor": load_processor(model_dir),
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
