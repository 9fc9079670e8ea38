"""The reference engine's ranks: commands from rank 0, and the tensor handoff.

Rank 0 runs the HTTP server; every rank runs the model. Rank 0's single model thread issues each
command by sending it to every other rank and then executing it itself, so every rank executes the
same commands in the same order, which tensor parallelism requires.

Commands and the handoff's agreement travel on `links`: one `multiprocessing` pipe between rank 0 and
each other rank, made by the launcher. The process group (gloo or NCCL) carries only tensors: the
model's own collectives and the baseline's `Broadcast`. Why not the process group for the small
messages too: each gloo collective hops to gloo's worker thread and back on both ranks, and on 2 CPU
ranks a command broadcast plus an all-reduce took 0.48 ms where a pipe message out and a reply back
take 0.08 ms (`broadcast_object_list`, two collectives, took 0.45 ms alone). A rank that dies closes
its end, so the others see EOF at once instead of waiting out a collective's timeout.

The handoff (`Copy`): rank 0 sends only the descriptors. Each rank attaches the sidecar's arena
once, validates every descriptor, copies each tensor out of shared memory into its own memory
(`ArenaReader.copy_out` re-checks the generation after copying) and drops every view. Then the ranks
agree: every other rank reports to rank 0 whether it succeeded, and rank 0 sends every rank the
verdict. Only when all succeeded does rank 0 answer headers: that is the ack that lets the sidecar
free the extent. If any rank failed, every rank drops what it copied. A rank that refused a descriptor
(bad, forged, stale: `DescriptorError`) logs why and says only that it refused; rank 0 then answers
with the protocol's one fixed message, since the reason describes the arena and the answer goes to
whoever sent the request.

On the CPU the copies land in buffers of the rank's `StagingPool` (engine/staging.py): memory kept
from one request to the next, whose pages are already faulted in. They go back to the pool when the
request's tensors are consumed (after `Generate`) or dropped (`Drop`, a failed handoff, `Stop`). On
an accelerator the copy goes straight to device memory, which torch's caching allocator already
keeps warm.

The baseline (`Broadcast`): images that arrived inline were preprocessed by rank 0 in its API
process, as in-process engines do, and their tensors are broadcast to the other ranks.

Streaming (`Generate` issued with `on_token`): every rank generates in lockstep, and rank 0 hands
each new token id to `on_token` the moment its model picks it (rank 0's ids are the answer: greedy
decoding picks the same on every rank). The callback runs on rank 0's model thread, between two
decoding steps, so it must be quick (the server's only schedules the id onto its event loop). One
that raises is logged and not called again, and generation goes on: a rank 0 that stopped
mid-generation would leave the other ranks waiting in the model's next collective.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from preprocess.protocol import DESCRIPTOR_ERROR, ArenaReader, DescriptorError, TensorDescriptor

from .model import VLModel
from .staging import Buffer, StagingPool

log = logging.getLogger("mm_engine.ranks")

Images = list[dict[str, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class Copy:
    request: str
    images: list[dict[str, TensorDescriptor]]
    checksums: bool = False


@dataclass(frozen=True, slots=True)
class Broadcast:
    request: str
    images: list[dict[str, tuple[tuple[int, ...], str]]]  # shapes and dtypes; the data follows


@dataclass(frozen=True, slots=True)
class Generate:
    request: str
    messages: list[dict[str, Any]]
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class Generated:
    tokens: list[int]  # the new ids only
    prompt_tokens: int  # the prompt's length, image placeholders expanded: what the model read


@dataclass(frozen=True, slots=True)
class Drop:
    request: str


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = Copy | Broadcast | Generate | Drop | Stop
OnToken = Callable[[int], None]


class HandoffError(Exception):
    """A rank could not take the tensors; `status` is what rank 0 answers.

    `refused`: a rank refused a descriptor; the message is then `DESCRIPTOR_ERROR` and nothing else,
    and `detail` (for the log, never for the answer) says which rank and, for rank 0, why.
    """

    def __init__(self, message: str, status: int = 400, *, refused: bool = False, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.refused = refused
        self.detail = detail or message


def checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class Rank:
    """One rank's state: its model shard, its arena reader, and the images staged per request."""

    model: VLModel
    shm_dir: str
    world: int
    rank: int
    # Rank 0: its pipe to each other rank, in rank order. Any other rank: its pipe to rank 0.
    links: Sequence[Connection] = ()
    staging: StagingPool = field(default_factory=StagingPool)
    staged: dict[str, Images] = field(default_factory=dict)
    reader: ArenaReader = field(init=False)
    # The staging buffers under each request's staged tensors, given back when those are dropped.
    _lent: dict[str, list[Buffer]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        expected = 0 if self.world == 1 else self.world - 1 if self.rank == 0 else 1
        if len(self.links) != expected:
            raise ValueError(f"rank {self.rank} of {self.world} needs {expected} link(s), got {len(self.links)}")
        self.reader = ArenaReader(self.shm_dir)

    # -- rank 0: issue a command to every rank --------------------------------------------------
    def issue(self, command: Command, tensors: Images | None = None, *, on_token: OnToken | None = None) -> Any:
        """Rank 0 only, on its model thread: send `command` to every other rank, then run it here.

        `on_token` (a `Generate` only): called with each new token id as rank 0 generates it.
        """
        for link in self.links:
            link.send(command)
        return self.execute(command, tensors, on_token=on_token)

    # -- every rank ----------------------------------------------------------------------------
    def follow(self) -> None:
        """Ranks > 0: execute rank 0's commands until Stop (or until rank 0 is gone)."""
        (leader,) = self.links
        while True:
            try:
                command: Command = leader.recv()
            except EOFError:
                log.warning("rank %d: rank 0 closed its link; stopping", self.rank)
                command = Stop()
            if isinstance(command, Stop):
                self.execute(command)
                return
            try:
                self.execute(command)
            except HandoffError as exc:
                # Expected, and rank 0 answers it. A refused descriptor was logged where it was found.
                if not exc.refused:
                    log.warning("rank %d: handoff %s failed: %s", self.rank, getattr(command, "request", "?"), exc)
            except Exception:
                # The same inputs fail the same way on rank 0, which reports it; stay in step.
                log.exception("rank %d: %s failed", self.rank, type(command).__name__)

    def execute(self, command: Command, tensors: Images | None = None, *, on_token: OnToken | None = None) -> Any:
        if isinstance(command, Copy):
            return self._copy(command)
        if isinstance(command, Broadcast):
            return self._broadcast(command, tensors)
        if isinstance(command, Generate):
            return self._generate(command, None if on_token is None else _guarded(on_token, command.request))
        if isinstance(command, Drop):
            self._release(command.request)
            return None
        if isinstance(command, Stop):
            for request in list(self.staged):
                self._release(request)
            self.staging.clear()
        return None

    def _generate(self, command: Generate, on_token: OnToken | None) -> Generated:
        buffers = self._lent.pop(command.request, [])
        try:
            return self._forward(command, on_token)
        except BaseException as exc:
            # The traceback's frames hold the staged tensors (views of `buffers`); without clearing
            # them the pool sees its buffers still referenced and has to give up on reusing them.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            self.staging.give(buffers)

    def _forward(self, command: Generate, on_token: OnToken | None) -> Generated:
        # The staged tensors die with this frame. build_inputs concatenates them into new tensors, so
        # the model never holds a view of a staging buffer, and generate() is synchronous: once this
        # returns, the buffers are free to go back to the pool.
        images = self.staged.pop(command.request, [])
        inputs = self.model.build_inputs(command.messages, images)
        prompt = inputs.get("input_ids")
        tokens = self.model.generate(inputs, max_new_tokens=command.max_new_tokens, on_token=on_token)
        return Generated(tokens, 0 if prompt is None else int(prompt.shape[-1]))

    def _release(self, request: str) -> None:
        """Drop a request's staged tensors, then give their buffers back (in that order: see StagingPool.give)."""
        self.staged.pop(request, None)
        self.staging.give(self._lent.pop(request, []))

    def _copy_one(self, desc: TensorDescriptor, buffers: list[Buffer], device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return self.reader.copy_out(desc, device)
        buffer = self.staging.take(desc.nbytes)
        buffers.append(buffer)  # before the copy: a failed copy gives it back too
        return self.reader.copy_out(desc, out=buffer.view(desc.shape, getattr(torch, desc.dtype)))

    def _copy(self, command: Copy) -> list[list[dict[str, str]]]:
        self._release(command.request)  # a repeated request id replaces what it had staged
        images: Images = []
        buffers: list[Buffer] = []
        sums: list[dict[str, str]] = []
        error, status, refused = "", 400, False
        try:
            for image in command.images:
                for desc in image.values():
                    self.reader.validate(desc)  # every descriptor, before anything is read
            device = self.model.device
            for image in command.images:
                copied = {name: self._copy_one(desc, buffers, device) for name, desc in image.items()}
                images.append(copied)
                if command.checksums:
                    sums.append({name: checksum(t) for name, t in copied.items()})
        except DescriptorError as exc:
            # One line, the cause: the answer will carry only the fixed message.
            log.warning("rank %d: %s: refused a tensor descriptor: %s", self.rank, command.request, exc.detail)
            error, refused = exc.detail or DESCRIPTOR_ERROR, True
        except (OSError, ValueError) as exc:
            error = str(exc)
        except Exception as exc:
            # Anything else (a failed allocation) must still reach the agreement, or the other ranks
            # would wait for this one's report forever.
            log.exception("rank %d: copying %s failed", self.rank, command.request)
            error, status = f"rank {self.rank}: {type(exc).__name__}: {exc}", 500
        except BaseException:
            images.clear()
            self.staging.give(buffers)  # the traceback may still hold a view: the pool then lets it go
            raise
        agreed, refusing, gathered = self._agree(not error, refused, sums)
        if not agreed:
            # Drop every view first (`copied` still names the last image's): the pool reuses a buffer
            # only when nothing points into it any more.
            images.clear()
            copied = {}
            self.staging.give(buffers)
            if refused or refusing:
                others = ", ".join(map(str, refusing))
                detail = f"rank {self.rank}: {error}" if refused else f"another rank ({others}) refused a descriptor"
                raise HandoffError(DESCRIPTOR_ERROR, 400, refused=True, detail=detail)
            raise HandoffError(error or "another rank could not read the tensors", status)
        self.staged[command.request] = images
        self._lent[command.request] = buffers
        return gathered

    def _agree(
        self, ok: bool, refused: bool, sums: list[dict[str, str]]
    ) -> tuple[bool, list[int], list[list[dict[str, str]]]]:
        """Whether every rank succeeded, known to every rank; rank 0 also learns which other ranks
        refused a descriptor (`refused`: this one did) and gets every rank's checksums."""
        if self.world == 1:
            return ok, [], [sums]
        if self.rank:
            (leader,) = self.links
            leader.send((ok, refused, sums))
            verdict: bool = leader.recv()
            return verdict, [], []
        reports: list[tuple[bool, bool, list[dict[str, str]]]] = [link.recv() for link in self.links]
        agreed = ok and all(report_ok for report_ok, _, _ in reports)
        for link in self.links:
            link.send(agreed)
        refusing = [r for r, (_, report_refused, _) in enumerate(reports, start=1) if report_refused]
        return agreed, refusing, [sums, *(report_sums for _, _, report_sums in reports)]

    def _broadcast(self, command: Broadcast, tensors: Images | None) -> None:
        self._release(command.request)
        images: Images = []
        for index, layout in enumerate(command.images):
            received: dict[str, torch.Tensor] = {}
            for name, (shape, dtype) in layout.items():
                if tensors is not None:  # rank 0: the source
                    tensor = tensors[index][name].contiguous()
                else:
                    tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                if self.world > 1:
                    dist.broadcast(tensor, src=0)
                received[name] = tensor.to(self.model.device)
            images.append(received)
        self.staged[command.request] = images


def _guarded(on_token: OnToken, request: str) -> OnToken:
    """`on_token`, except that once it raises it is logged and skipped: generation must go on (module docstring)."""
    failed = False

    def call(token: int) -> None:
        nonlocal failed
        if failed:
            return
        try:
            on_token(token)
        except Exception:
            failed = True
            log.exception("%s: the token callback failed; generating on without it", request)

    return call
