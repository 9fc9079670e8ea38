"""The reference engine's ranks: one process group, commands from rank 0, and the tensor handoff.

Rank 0 runs the HTTP server; every rank runs the model. Rank 0's single model thread issues each
command by broadcasting it (a small object: `broadcast_object_list`) and then executing it itself,
so every rank executes the same commands in the same order, which tensor parallelism requires.

The handoff (`Copy`): rank 0 sends only the descriptors. Each rank attaches the sidecar's arena
once, validates every descriptor, copies each tensor out of shared memory into its own memory
(`ArenaReader.copy_out` re-checks the generation after copying), drops every view, and the ranks
agree with an all-reduce that all of them succeeded. Only then does rank 0 answer headers: that is
the ack that lets the sidecar free the extent. If any rank failed, every rank drops what it copied.

The baseline (`Broadcast`): images that arrived inline were preprocessed by rank 0 in its API
process, as in-process engines do, and their tensors are broadcast to the other ranks.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from preprocess.protocol import ArenaReader, DescriptorError, TensorDescriptor

from .model import VLModel

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
class Drop:
    request: str


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = Copy | Broadcast | Generate | Drop | Stop


class HandoffError(Exception):
    """A rank could not take the tensors; `status` is what rank 0 answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class Rank:
    """One rank's state: its model shard, its arena reader, and the images staged per request."""

    model: VLModel
    shm_dir: str
    world: int
    rank: int
    staged: dict[str, Images] = field(default_factory=dict)
    reader: ArenaReader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = ArenaReader(self.shm_dir)

    # -- rank 0: issue a command to every rank --------------------------------------------------
    def issue(self, command: Command, tensors: Images | None = None) -> Any:
        """Rank 0 only, on its model thread: broadcast `command`, then run it here."""
        if self.world > 1:
            dist.broadcast_object_list([command], src=0)
        return self.execute(command, tensors)

    # -- every rank ----------------------------------------------------------------------------
    def follow(self) -> None:
        """Ranks > 0: execute rank 0's commands until Stop."""
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            command = box[0]
            if isinstance(command, Stop):
                return
            try:
                self.execute(command)
            except Exception:
                # The same inputs fail the same way on rank 0, which reports it; stay in step.
                log.exception("rank %d: %s failed", self.rank, type(command).__name__)

    def execute(self, command: Command, tensors: Images | None = None) -> Any:
        if isinstance(command, Copy):
            return self._copy(command)
        if isinstance(command, Broadcast):
            return self._broadcast(command, tensors)
        if isinstance(command, Generate):
            images = self.staged.pop(command.request, [])
            inputs = self.model.build_inputs(command.messages, images)
            return self.model.generate(inputs, max_new_tokens=command.max_new_tokens)
        if isinstance(command, Drop):
            self.staged.pop(command.request, None)
            return None
        return None

    def _copy(self, command: Copy) -> list[list[dict[str, str]]]:
        images: Images = []
        sums: list[dict[str, str]] = []
        error = ""
        try:
            for image in command.images:
                for desc in image.values():
                    self.reader.validate(desc)  # every descriptor, before anything is read
            for image in command.images:
                copied = {name: self.reader.copy_out(desc, self.model.device) for name, desc in image.items()}
                images.append(copied)
                if command.checksums:
                    sums.append({name: checksum(t) for name, t in copied.items()})
        except (DescriptorError, OSError, ValueError) as exc:
            error = str(exc)
        ok = torch.tensor([0 if error else 1], dtype=torch.int32)
        gathered: list[Any] = [sums]
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if command.checksums:  # every rank has the same command: they agree on whether to gather
                gathered = [None] * self.world
                dist.all_gather_object(gathered, sums)
        if not int(ok.item()):
            images.clear()
            raise HandoffError(error or "another rank could not read the tensors")
        self.staged[command.request] = images
        return gathered

    def _broadcast(self, command: Broadcast, tensors: Images | None) -> None:
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
