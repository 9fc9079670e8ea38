"""The sidecar's configuration: a tree of frozen dataclasses, loaded from YAML and validated once.

Every field carries its bounds in `field(metadata=...)`; the loader walks the dataclasses, converts
each YAML value to the field's type and reports the first problem as one line that names the key
path (`gate.max_concurrent: must be >= 1, got 0`). Nothing here is read again after start-up.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from preprocess.processors import ProcessorError, read_spec, resolve_processor


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming the key path."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as `4GiB`, `512 MB`, `1.5Gi`; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size (bytes or a string like '4GiB'), got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            number = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
            if number.denominator == 1:
                return int(number)
    raise ValueError(f"must be a size (bytes or a string like '4GiB'), got {value!r}")


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class Size(int):
    """A byte count; YAML may spell it `4GiB`. A marker type for the loader."""


def _bounds(*, ge: float | None = None, le: float | None = None, doc: str = "") -> dict[str, Any]:
    return {"ge": ge, "le": le, "doc": doc}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_bounds(doc="address to listen on"))
    port: int = field(default=8000, metadata=_bounds(ge=0, le=65535, doc="TCP port (0: any free port)"))
    max_body_bytes: Size = field(
        default=Size(64 * 1024**2), metadata=_bounds(ge=1024, doc="largest request body accepted (413 above)")
    )
    max_parse_bytes: Size = field(
        default=Size(8 * 1024**2),
        metadata=_bounds(
            ge=1024,
            doc="JSON of one body parsed on the event loop, its long base64 runs aside (413 above: ~1.6 ms a MiB)",
        ),
    )
    shutdown_timeout_s: float = field(
        default=30.0, metadata=_bounds(ge=0, doc="how long in-flight requests may run after SIGTERM")
    )
    max_body_memory: Size = field(
        default=Size(1024**3),
        metadata=_bounds(ge=1024, doc="request bodies held in memory at once, all requests together (503 above)"),
    )
    text_body_share: float = field(
        default=0.25,
        metadata=_bounds(ge=0, le=0.9, doc="part of server.max_body_memory that multimodal bodies may never hold"),
    )
    memory_limit: Size | None = field(
        default=None, metadata=_bounds(ge=1, doc="container memory limit; start-up fails if the ceiling exceeds it")
    )
    body_timeout_s: float = field(
        default=30.0, metadata=_bounds(ge=0.01, doc="longest time to receive a request body (slow clients: 408)")
    )
    header_timeout_s: float = field(
        default=10.0,
        metadata=_bounds(
            ge=0.01,
            doc="longest wait for a request's headers, from the connection's opening or the request's first "
            "byte (slow clients: closed, 408)",
        ),
    )
    keepalive_timeout_s: float = field(
        default=75.0, metadata=_bounds(ge=0.01, doc="an idle keep-alive connection is closed after this")
    )
    debug_endpoints: bool = field(
        default=False, metadata=_bounds(doc="serve GET /debug/state (leases, queue, arena, workers) for tests")
    )


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = field(
        default="http://127.0.0.1:8001", metadata=_bounds(doc="engine base URL: http(s):// or unix:///path")
    )
    mode: Literal["passthrough", "offload"] = field(
        default="passthrough", metadata=_bounds(doc="passthrough: forward images inline; offload: tensors over shm")
    )
    connect_timeout_s: float = field(default=5.0, metadata=_bounds(ge=0.001, doc="TCP/UDS connect timeout"))
    ack_timeout_s: float = field(
        default=300.0, metadata=_bounds(ge=0.001, doc="longest wait for the engine's ack of a multimodal request")
    )
    read_timeout_s: float | None = field(
        default=None, metadata=_bounds(ge=0.001, doc="longest silence between response chunks (null: none)")
    )
    stream_upgrade: bool = field(
        default=True, metadata=_bounds(doc="send non-streaming multimodal requests upstream as streams")
    )
    engine: Literal["generic", "vllm"] = field(
        default="generic",
        metadata=_bounds(
            doc="the engine's non-streaming answer shape, given to answers re-assembled from streams "
            "(vllm: vLLM 0.32's keys; generic: what the stream carried)"
        ),
    )
    health_path: str = field(default="/health", metadata=_bounds(doc="engine path probed by /readyz"))
    max_connections: int = field(default=1024, metadata=_bounds(ge=1, doc="connection pool size to the engine"))

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise ValueError(f"url: must name a host, got {self.url!r}")
        elif parts.scheme == "unix":
            if not parts.path.startswith("/"):
                raise ValueError(f"url: unix:// needs an absolute socket path, got {self.url!r}")
        else:
            raise ValueError(f"url: must start with http://, https:// or unix://, got {self.url!r}")
        if not self.health_path.startswith("/"):
            raise ValueError(f"health_path: must start with '/', got {self.health_path!r}")


@dataclass(frozen=True, slots=True)
class GateConfig:
    max_concurrent: int = field(default=2, metadata=_bounds(ge=1, doc="multimodal requests holding a slot at once"))
    max_bytes: Size = field(
        default=Size(1024**3), metadata=_bounds(ge=1, doc="bytes reserved by multimodal requests at once")
    )
    max_queue: int = field(default=64, metadata=_bounds(ge=0, doc="waiters beyond which requests get 429"))
    queue_timeout_s: float = field(default=30.0, metadata=_bounds(ge=0, doc="longest wait in the queue"))
    retry_after_s: float = field(default=1.0, metadata=_bounds(ge=0, doc="Retry-After sent with 429/529"))
    anthropic_overload_status: Literal[429, 529] = field(
        default=429, metadata=_bounds(doc="status for overload on Anthropic routes")
    )
    unknown_image_bytes: Size = field(
        default=Size(12 * 1024**2),
        metadata=_bounds(ge=1, doc="reservation for a part whose size the sidecar cannot read (URL, video, audio)"),
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_images_per_request: int = field(default=16, metadata=_bounds(ge=0, doc="media parts in one request"))
    max_image_bytes: Size = field(default=Size(20 * 1024**2), metadata=_bounds(ge=1, doc="encoded bytes of one part"))
    max_image_pixels: int = field(
        default=40_000_000, metadata=_bounds(ge=1, doc="width x height of one image (decompression bombs)")
    )
    max_aspect_ratio: float = field(
        default=200.0, metadata=_bounds(ge=1, doc="longer side / shorter side of one image (resize blow-ups)")
    )
    allow_remote_urls: bool = field(
        default=False, metadata=_bounds(doc="accept http(s) image URLs (fetched by the sidecar, never the engine)")
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(), metadata=_bounds(doc="when set, the only hosts remote URLs may name")
    )

    allowed_networks: tuple[str, ...] = field(
        default=(), metadata=_bounds(doc="CIDRs exempt from the private-address rule (internal image stores)")
    )
    fetch_timeout_s: float = field(default=10.0, metadata=_bounds(ge=0.001, doc="whole fetch of one remote image"))
    max_redirects: int = field(default=3, metadata=_bounds(ge=0, le=20, doc="redirects followed per remote image"))
    max_messages_per_request: int = field(
        default=2048, metadata=_bounds(ge=1, doc="messages (Responses: input items) in one request")
    )
    max_parts_per_request: int = field(
        default=4096, metadata=_bounds(ge=1, doc="content parts of any type in one request, nested ones included")
    )
    max_header_bytes: Size = field(
        default=Size(1024**2),
        metadata=_bounds(ge=1024, doc="an inline image's header must lie in its first this many bytes (400 beyond)"),
    )
    max_json_objects: int = field(
        default=20_000,
        metadata=_bounds(ge=16, doc="'{' bytes in a body, strings included, counted as it arrives (413 above)"),
    )
    max_json_items: int = field(
        default=200_000,
        metadata=_bounds(ge=16, doc="',' and '[' bytes in a body, strings included, counted as it arrives (413 above)"),
    )
    allowed_part_types: tuple[str, ...] = field(
        default=(), metadata=_bounds(doc="content part types forwarded unchecked to an engine that understands them")
    )

    def __post_init__(self) -> None:
        from preprocess.fetch import normalize_host_entry  # noqa: PLC0415 - fetch pulls in aiohttp's client

        from .classify import INTERNAL_PART_TYPES, PRICED_PART_TYPES  # noqa: PLC0415 - classify imports this module

        for i, cidr in enumerate(self.allowed_networks):
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise ValueError(f"allowed_networks[{i}]: not a network, got {cidr!r}") from None
        # One spelling for both checks (the walker's and the fetcher's): the fetcher's normal form.
        hosts = []
        for i, entry in enumerate(self.allowed_hosts):
            try:
                hosts.append(normalize_host_entry(entry))
            except ValueError:
                raise ValueError(f"allowed_hosts[{i}]: empty entry {entry!r}") from None
        object.__setattr__(self, "allowed_hosts", tuple(hosts))
        for i, ptype in enumerate(self.allowed_part_types):
            if ptype in INTERNAL_PART_TYPES:
                raise ValueError(
                    f"allowed_part_types[{i}]: {ptype!r} is made by the sidecar; clients may never send it"
                )
            if ptype in PRICED_PART_TYPES:
                raise ValueError(f"allowed_part_types[{i}]: {ptype!r} is a media part the sidecar checks and prices")


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    extra_paths: tuple[str, ...] = field(
        default=("/tokenize", "/detokenize"),
        metadata=_bounds(
            doc="engine paths besides the API routes that accept POST/PUT/PATCH/DELETE (others: 404); "
            "a body with `messages` is walked and gated like chat"
        ),
    )

    def __post_init__(self) -> None:
        for i, path in enumerate(self.extra_paths):
            if not path.startswith("/"):
                raise ValueError(f"extra_paths[{i}]: must start with '/', got {path!r}")


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    processor: str | None = field(
        default=None,
        metadata=_bounds(doc="image processor: a preset in config/processors or a directory (null: price decoded RGB)"),
    )
    workers: int = field(default=2, metadata=_bounds(ge=1, le=256, doc="preprocessing worker processes"))
    task_timeout_s: float = field(default=60.0, metadata=_bounds(ge=0.01, doc="longest preprocessing of one image"))
    worker_nice: int = field(
        default=10,
        metadata=_bounds(
            ge=0, le=19, doc="workers' niceness (and SCHED_BATCH when > 0): the event loop wins a shared core"
        ),
    )
    max_concurrent_fetches: int = field(
        default=8, metadata=_bounds(ge=1, doc="remote images being fetched at once, all requests together")
    )
    transport_dtype: Literal["float32", "bfloat16", "uint8"] = field(
        default="float32",
        metadata=_bounds(
            doc="offload: pixel_values in the arena: float32, normalised; bfloat16, those rounded as torch rounds "
            "them (half the bytes: what a bfloat16 model computes with); uint8, raw patches (a quarter of the "
            "bytes) that the engine normalises"
        ),
    )
    fast_path: bool = field(
        default=True,
        metadata=_bounds(
            doc="Qwen2-VL / Qwen2.5-VL, CLIP, SigLIP: workers' fast path, bit-identical to transformers "
            "(false: transformers)"
        ),
    )

    def __post_init__(self) -> None:
        family = None
        if self.processor is not None:
            try:
                family = read_spec(resolve_processor(self.processor)).family
            except ProcessorError as exc:
                raise ValueError(f"processor: {exc}") from None
        # Engines normalise uint8 patches for the Qwen2-VL family only (vLLM on the device, the
        # reference engine in build_inputs).
        if self.transport_dtype == "uint8" and family != "qwen2_vl":
            raise ValueError(f"transport_dtype: uint8 needs a Qwen2-VL-family processor, got {self.processor!r}")


@dataclass(frozen=True, slots=True)
class ShmConfig:
    name: str = field(
        default="main", metadata=_bounds(doc="this sidecar instance: segment /dev/shm/mm-sidecar-<name>-<pid>")
    )
    dir: str = field(default="/dev/shm", metadata=_bounds(doc="tmpfs directory holding the segment"))

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}", self.name):
            raise ValueError(f"name: letters, digits, '.', '_' and '-' only, got {self.name!r}")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    path: str = field(default="/metrics", metadata=_bounds(doc="path that serves Prometheus metrics"))

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path: must start with '/', got {self.path!r}")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    shm: ShmConfig = field(default_factory=ShmConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    routes: RoutesConfig = field(default_factory=RoutesConfig)

    def __post_init__(self) -> None:
        if self.upstream.mode == "offload" and self.preprocess.processor is None:
            raise ValueError("preprocess.processor: offload mode needs the engine's image processor (a preset or dir)")
        if self.metrics.path in ("/healthz", "/readyz") or self.metrics.path.startswith("/v1/"):
            raise ValueError(f"metrics.path: must not shadow a served route, got {self.metrics.path!r}")


def _type_name(tp: Any) -> str:
    if tp is Size:
        return "a size"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    return str(tp)


def _convert(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(path, value, args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"{path}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be a list, got {value!r}")
        return tuple(_convert(f"{path}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(path, value, tp)
    if tp is Size:
        try:
            return Size(parse_size(value))
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be a boolean, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {path} has an unsupported type {tp!r}")  # a bug in this module


def _build(prefix: str, raw: Any, cls: Any) -> Any:
    where = prefix or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{_join(prefix, str(key))}: unknown key (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        path = _join(prefix, name)
        value = _convert(path, raw[name], hints[name])
        lo, hi = f.metadata.get("ge"), f.metadata.get("le")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if lo is not None and value < lo:
                raise ConfigError(f"{path}: must be >= {lo}, got {raw[name]!r}")
            if hi is not None and value > hi:
                raise ConfigError(f"{path}: must be <= {hi}, got {raw[name]!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        # __post_init__ checks name their key relative to the section; prefix it.
        raise ConfigError(_join(prefix, str(exc)) if prefix else str(exc)) from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def from_mapping(raw: Any) -> Config:
    """Validate a parsed YAML document; raises ConfigError naming the first bad key."""
    config: Config = _build("", raw, Config)
    return config


def load(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config is not UTF-8 text (byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {problem}{where}") from None
    except ValueError as exc:  # PyYAML's own conversions (e.g. an integer over Python's digit limit)
        raise ConfigError(f"{path}: invalid YAML value: {exc}") from None
    return from_mapping(raw)


def to_mapping(config: Any) -> dict[str, Any]:
    """The effective config as plain data (what `check-config` prints)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_mapping(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, Size):
            out[f.name] = int(value)
        else:
            out[f.name] = value
    return out


def describe(cls: Any = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key path, default, doc) for every leaf key: the README's config reference is generated from it."""
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(cls):
        path = _join(prefix, f.name)
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                rows.extend(describe(type(default), path))
                continue
        else:
            default = f.default
        rows.append((path, default, f.metadata.get("doc", "")))
    return rows
