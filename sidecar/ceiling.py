"""The worst-case memory of the sidecar, from its config alone (printed by `check-config`).

    ceiling = base + request bodies + remote fetches + arena + workers x (worker base + per-image peak)

Every term is a bound the config enforces, except the two bases (measured for this code and its
dependencies) and the per-image peak (an estimate from the processor's geometry, named below). The
arena and the workers exist in offload mode only. `serve` refuses to
start when `server.memory_limit` is set below the ceiling, naming the terms, so a container limit
that the sidecar could exceed under load is caught at deploy time instead of as an OOM kill.
"""

from __future__ import annotations

from dataclasses import dataclass

from preprocess.processors import read_spec, resolve_processor
from preprocess.protocol import segment_size_for

from .config import Config, format_size

# Measured: an idle sidecar process is ~55 MiB RSS (Python, aiohttp, numpy, PIL); rounded up.
SIDECAR_BASE = 128 * 1024**2


# Measured: a worker that imported transformers and loaded a processor is ~330 MiB RSS; rounded up.
WORKER_BASE = 448 * 1024**2
# The processors resize a uint8 image, then rescale and normalise it as float32: about four float32
# copies of the resized image at most, on top of the decoded RGBA source and the encoded bytes.
_FLOAT_COPIES = 4


@dataclass(frozen=True, slots=True)
class Term:
    name: str
    nbytes: int
    how: str


@dataclass(frozen=True, slots=True)
class Ceiling:
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return sum(t.nbytes for t in self.terms)

    def describe(self) -> str:
        lines = [f"  {t.name:<16} {format_size(t.nbytes):>11}  {t.how}" for t in self.terms]
        return "\n".join([*lines, f"  {'total':<16} {format_size(self.total):>11}"])


def per_image_peak(config: Config) -> int:
    """A worker's peak for one image at the limits (an estimate, see _FLOAT_COPIES)."""
    pixels = config.limits.max_image_pixels
    resized = pixels
    if config.preprocess.processor is not None:
        spec = read_spec(resolve_processor(config.preprocess.processor))
        if spec.max_pixels is not None:
            resized = min(pixels, spec.max_pixels)
    return config.limits.max_image_bytes * 7 // 3 + pixels * 4 + resized * 3 * 4 * _FLOAT_COPIES


def memory_ceiling(config: Config) -> Ceiling:
    terms = [Term("base", SIDECAR_BASE, "the sidecar process at idle (measured, rounded up)")]
    # The budget charges a parsed body twice (the tree, then the bytes sent upstream): both are inside it.
    terms.append(
        Term("request bodies", config.server.max_body_memory, "server.max_body_memory (parsed copies included)")
    )
    limits = config.limits
    if limits.allow_remote_urls:
        # Fetched bytes, then their base64 text in the rewritten body (4/3).
        fetches = config.preprocess.max_concurrent_fetches * limits.max_image_bytes * 7 // 3
        terms.append(Term("remote fetches", fetches, "preprocess.max_concurrent_fetches x max_image_bytes x 7/3"))
    if config.upstream.mode == "offload":
        workers = config.preprocess.workers
        terms.append(
            Term(
                "arena",
                segment_size_for(config.gate.max_bytes),
                "gate.max_bytes of data pages, plus the segment's header page and page table",
            )
        )
        terms.append(
            Term(
                "workers",
                workers * (WORKER_BASE + per_image_peak(config)),
                f"preprocess.workers={workers} x (worker base + one image at limits.max_image_pixels)",
            )
        )
    return Ceiling(tuple(terms))


def check_limit(config: Config) -> str | None:
    """The reason `serve` must refuse to start, or None."""
    limit = config.server.memory_limit
    ceiling = memory_ceiling(config)
    if limit is None or ceiling.total <= limit:
        return None
    return (
        f"server.memory_limit={limit} ({format_size(limit)}) is below the worst-case memory of this config, "
        f"{format_size(ceiling.total)}:\n{ceiling.describe()}\n"
        "lower the terms above (or raise the limit)"
    )
