"""Tests for sidecar.config (schema, sizes, loading, describe) and the `check-config` command."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import (
    Config,
    ConfigError,
    GateConfig,
    LimitsConfig,
    MetricsConfig,
    ServerConfig,
    Size,
    UpstreamConfig,
    describe,
    from_mapping,
    load,
    parse_size,
    to_mapping,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "sidecar.yaml"


def config_error(raw: Any) -> str:
    """The message of the ConfigError that `raw` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        from_mapping(raw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def size_keys(cls: Any = Config, prefix: str = "") -> list[str]:
    """Every key path whose type is Size (optional or not), found from the schema itself."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            keys.extend(size_keys(tp, path))
        elif tp is Size or Size in typing.get_args(tp):
            keys.append(path)
    return keys


def nested(path: str, value: Any) -> dict[str, Any]:
    section, key = path.split(".")
    return {section: {key: value}}


def leaf_paths(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            paths.extend(leaf_paths(value, path))
        else:
            paths.append(path)
    return paths


# --------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1, 1),
        (4096, 4096),
        ("4096", 4096),
        ("4GiB", 4 * 1024**3),
        ("4gib", 4 * 1024**3),
        ("512 MB", 512 * 1000**2),
        ("512MiB", 512 * 1024**2),
        ("1.5Gi", 3 * 1024**3 // 2),
        ("10k", 10_000),
        ("10Ki", 10 * 1024),
        ("7B", 7),
        ("2T", 2 * 1000**4),
        ("1TiB", 1024**4),
        (" 64 KiB ", 64 * 1024),
        ("0.5k", 500),
        # Exact decimal arithmetic: 0.067 * 10**9 is a whole number of bytes, though not in floats.
        ("0.067GB", 67_000_000),
        ("0.535GB", 535_000_000),
        ("9007199254740993", 2**53 + 1),  # one past float precision: exact, not rounded
    ],
)
def test_parse_size_accepts(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "GiB",
        "4 GiBs",
        "4XB",
        "-1",
        "-1GiB",
        "1e9",
        "1,000",
        "4 G i B",
        "0.5",  # half a byte
        "1.0001k",  # 1000.1 bytes
        "0.3B",
        "nan",
        "inf",
        True,
        False,
        1.5,
        0.1,
        None,
        [],
        {"n": 1},
    ],
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"must be a size \(bytes or a string like '4GiB'\), got"):
        parse_size(bad)


def test_parse_size_huge_digit_strings_do_not_overflow() -> None:
    # 400 digits overflow a float; the result must be the exact integer, not an OverflowError.
    digits = "1" * 400
    assert parse_size(digits) == int(digits)
    assert parse_size(digits + "k") == int(digits) * 1000


# --------------------------------------------------------------------------- from_mapping: defaults


@pytest.mark.parametrize("raw", [None, {}])
def test_empty_document_gives_defaults(raw: Any) -> None:
    assert from_mapping(raw) == Config()


def test_defaults() -> None:
    c = Config()
    assert c.server == ServerConfig()
    assert c.server.port == 8000
    assert c.server.max_body_bytes == 64 * 1024**2
    assert c.upstream.url == "http://127.0.0.1:8001"
    assert c.upstream.mode == "passthrough"
    assert c.upstream.read_timeout_s is None
    assert c.gate.max_concurrent == 2
    assert c.gate.max_bytes == 1024**3
    assert c.gate.anthropic_overload_status == 429
    assert c.limits.allowed_hosts == ()
    assert c.limits.allow_remote_urls is False
    assert c.metrics.path == "/metrics"


@pytest.mark.parametrize("section", ["server", "upstream", "gate", "limits", "metrics"])
def test_null_or_empty_section_gives_its_defaults(section: str) -> None:
    assert from_mapping({section: None}) == Config()
    assert from_mapping({section: {}}) == Config()


# --------------------------------------------------------------------------- from_mapping: every section


def test_every_section_is_read() -> None:
    c = from_mapping(
        {
            "server": {
                "host": "0.0.0.0",
                "port": 9000,
                "max_body_bytes": "8MiB",
                "shutdown_timeout_s": 2,
            },
            "upstream": {
                "url": "unix:///run/engine.sock",
                "mode": "passthrough",
                "connect_timeout_s": 1.5,
                "ack_timeout_s": 60,
                "read_timeout_s": 12.5,
                "stream_upgrade": False,
                "health_path": "/v1/health",
                "max_connections": 8,
            },
            "gate": {
                "max_concurrent": 4,
                "max_bytes": "2GiB",
                "max_queue": 0,
                "queue_timeout_s": 0,
                "retry_after_s": 2.5,
                "anthropic_overload_status": 529,
                "unknown_image_bytes": "4MiB",
            },
            "limits": {
                "max_images_per_request": 3,
                "max_image_bytes": "5MB",
                "max_image_pixels": 1_000_000,
                "allow_remote_urls": True,
                "allowed_hosts": ["images.example.com", "cdn.example.org"],
            },
            "metrics": {"path": "/internal/metrics"},
        }
    )
    assert c.server == ServerConfig(
        host="0.0.0.0",
        port=9000,
        max_body_bytes=Size(8 * 1024**2),
        shutdown_timeout_s=2.0,
    )
    assert c.upstream == UpstreamConfig(
        url="unix:///run/engine.sock",
        mode="passthrough",
        connect_timeout_s=1.5,
        ack_timeout_s=60.0,
        read_timeout_s=12.5,
        stream_upgrade=False,
        health_path="/v1/health",
        max_connections=8,
    )
    assert c.gate == GateConfig(
        max_concurrent=4,
        max_bytes=Size(2 * 1024**3),
        max_queue=0,
        queue_timeout_s=0.0,
        retry_after_s=2.5,
        anthropic_overload_status=529,
        unknown_image_bytes=Size(4 * 1024**2),
    )
    assert c.limits == LimitsConfig(
        max_images_per_request=3,
        max_image_bytes=Size(5_000_000),
        max_image_pixels=1_000_000,
        allow_remote_urls=True,
        allowed_hosts=("images.example.com", "cdn.example.org"),
    )
    assert c.metrics == MetricsConfig(path="/internal/metrics")


def test_numbers_are_converted_to_field_types() -> None:
    c = from_mapping({"server": {"shutdown_timeout_s": 3}, "gate": {"max_bytes": 4096}})
    assert type(c.server.shutdown_timeout_s) is float
    assert type(c.gate.max_bytes) is Size
    assert c.gate.max_bytes == 4096


def test_optional_keys_accept_null() -> None:
    c = from_mapping({"upstream": {"read_timeout_s": None}})
    assert c.upstream.read_timeout_s is None


def test_offload_mode_needs_a_processor() -> None:
    assert config_error({"upstream": {"mode": "offload"}}) == (
        "preprocess.processor: offload mode needs the engine's image processor (a preset or dir)"
    )
    c = from_mapping({"upstream": {"mode": "offload"}, "preprocess": {"processor": "qwen2-vl"}})
    assert c.upstream.mode == "offload"


def test_uint8_transport_needs_a_qwen2_vl_family_processor() -> None:
    # The engines normalise uint8 patches for the Qwen2-VL family only.
    for processor in ("siglip", None):
        message = config_error({"preprocess": {"processor": processor, "transport_dtype": "uint8"}})
        assert message == (f"preprocess.transport_dtype: uint8 needs a Qwen2-VL-family processor, got {processor!r}"), (
            message
        )
    c = from_mapping({"preprocess": {"processor": "qwen2.5-vl", "transport_dtype": "uint8"}})
    assert c.preprocess.transport_dtype == "uint8"
    assert "must be one of 'float32', 'bfloat16', 'uint8'" in config_error(
        {"preprocess": {"transport_dtype": "float16"}}
    )


def test_unknown_processor_is_refused_naming_the_presets() -> None:
    message = config_error({"preprocess": {"processor": "no-such-model"}})
    assert message.startswith("preprocess.processor: image processor 'no-such-model' is neither a preset (")
    assert "qwen2-vl" in message


def test_https_and_ipv6_upstream_urls() -> None:
    assert from_mapping({"upstream": {"url": "https://engine.internal:8443"}}).upstream.url == (
        "https://engine.internal:8443"
    )
    assert from_mapping({"upstream": {"url": "http://[::1]:8001"}}).upstream.url == "http://[::1]:8001"


@pytest.mark.parametrize("key", size_keys())
def test_every_size_key_accepts_strings(key: str) -> None:
    c = from_mapping(nested(key, "2GiB"))
    section, name = key.split(".")
    value = getattr(getattr(c, section), name)
    assert value == 2 * 1024**3
    assert isinstance(value, Size)


@pytest.mark.parametrize("key", size_keys())
def test_every_size_key_rejects_bad_strings(key: str) -> None:
    message = config_error(nested(key, "lots"))
    assert message == f"{key}: must be a size (bytes or a string like '4GiB'), got 'lots'"


def test_size_keys_found() -> None:
    # Guards the parametrization above against an empty list.
    assert set(size_keys()) >= {
        "server.max_body_bytes",
        "gate.max_bytes",
        "gate.unknown_image_bytes",
        "limits.max_image_bytes",
    }


def test_gate_max_bytes_2gib() -> None:
    assert from_mapping({"gate": {"max_bytes": "2GiB"}}).gate.max_bytes == 2 * 1024**3


# --------------------------------------------------------------------------- from_mapping: errors


def test_unknown_top_level_key() -> None:
    message = config_error({"sever": {"port": 1}})
    assert message.startswith("sever: unknown key")
    assert "server" in message  # lists the known keys


def test_unknown_nested_key() -> None:
    message = config_error({"gate": {"max_concurent": 4}})
    assert message.startswith("gate.max_concurent: unknown key")
    assert "max_concurrent" in message


def test_unknown_key_reported_before_bad_values() -> None:
    # The typo is the problem to report, whatever else in the section is wrong.
    assert config_error({"gate": {"max_concurrent": 0, "max_concurent": 4}}).startswith("gate.max_concurent:")


def test_non_string_key() -> None:
    assert config_error({"gate": {1: 2}}).startswith("gate.1: unknown key")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # string for int / number / bool / size
        ({"server": {"port": "8000"}}, "server.port: must be an integer, got '8000'"),
        ({"gate": {"queue_timeout_s": "30"}}, "gate.queue_timeout_s: must be a number, got '30'"),
        ({"upstream": {"stream_upgrade": "yes"}}, "upstream.stream_upgrade: must be a boolean, got 'yes'"),
        # bool for int / number / size
        ({"gate": {"max_concurrent": True}}, "gate.max_concurrent: must be an integer, got True"),
        ({"gate": {"retry_after_s": False}}, "gate.retry_after_s: must be a number, got False"),
        (
            {"gate": {"max_bytes": True}},
            "gate.max_bytes: must be a size (bytes or a string like '4GiB'), got True",
        ),
        # float for int
        ({"gate": {"max_queue": 1.5}}, "gate.max_queue: must be an integer, got 1.5"),
        # int for bool / string
        ({"limits": {"allow_remote_urls": 1}}, "limits.allow_remote_urls: must be a boolean, got 1"),
        ({"server": {"host": 127}}, "server.host: must be a string, got 127"),
        # list for mapping, mapping for list, scalar for mapping
        ({"gate": [1, 2]}, "gate: must be a mapping, got [1, 2]"),
        ({"server": "fast"}, "server: must be a mapping, got 'fast'"),
        ({"limits": {"allowed_hosts": {"a": 1}}}, "limits.allowed_hosts: must be a list, got {'a': 1}"),
        ({"limits": {"allowed_hosts": "example.com"}}, "limits.allowed_hosts: must be a list, got 'example.com'"),
        # whole document not a mapping
        ([1, 2], "config: must be a mapping, got [1, 2]"),
        ("gate", "config: must be a mapping, got 'gate'"),
        # null for a non-optional key
        ({"gate": {"max_concurrent": None}}, "gate.max_concurrent: must be an integer, got None"),
        # list items
        ({"limits": {"allowed_hosts": ["a.example", 1]}}, "limits.allowed_hosts[1]: must be a string, got 1"),
        ({"limits": {"allowed_hosts": [None]}}, "limits.allowed_hosts[0]: must be a string, got None"),
    ],
)
def test_wrong_types(raw: Any, expected: str) -> None:
    assert config_error(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"gate": {"max_concurrent": 0}}, "gate.max_concurrent: must be >= 1, got 0"),
        ({"gate": {"max_queue": -1}}, "gate.max_queue: must be >= 0, got -1"),
        ({"gate": {"max_bytes": 0}}, "gate.max_bytes: must be >= 1, got 0"),
        ({"gate": {"max_bytes": "0GiB"}}, "gate.max_bytes: must be >= 1, got '0GiB'"),
        ({"server": {"port": 65536}}, "server.port: must be <= 65535, got 65536"),
        ({"server": {"port": -1}}, "server.port: must be >= 0, got -1"),
        ({"server": {"max_body_bytes": 1023}}, "server.max_body_bytes: must be >= 1024, got 1023"),
        ({"upstream": {"connect_timeout_s": 0}}, "upstream.connect_timeout_s: must be >= 0.001, got 0"),
        ({"upstream": {"read_timeout_s": 0}}, "upstream.read_timeout_s: must be >= 0.001, got 0"),
        ({"limits": {"max_image_pixels": 0}}, "limits.max_image_pixels: must be >= 1, got 0"),
    ],
)
def test_out_of_range(raw: Any, expected: str) -> None:
    assert config_error(raw) == expected


def test_range_edges_are_inclusive() -> None:
    c = from_mapping({"gate": {"max_concurrent": 1, "max_queue": 0}, "server": {"port": 65535}})
    assert (c.gate.max_concurrent, c.gate.max_queue, c.server.port) == (1, 0, 65535)


@pytest.mark.parametrize("mode", ["proxy", "Passthrough", "", None, 1])
def test_upstream_mode_choices(mode: Any) -> None:
    message = config_error({"upstream": {"mode": mode}})
    assert message == f"upstream.mode: must be one of 'passthrough', 'offload', got {mode!r}"


@pytest.mark.parametrize("status", [500, 503, "429", True, 429.5])
def test_anthropic_overload_status_choices(status: Any) -> None:
    message = config_error({"gate": {"anthropic_overload_status": status}})
    assert message == f"gate.anthropic_overload_status: must be one of 429, 529, got {status!r}"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://engine:21", "must start with http://, https:// or unix://"),
        ("engine:8001", "must start with http://, https:// or unix://"),
        ("127.0.0.1:8001", "must start with http://, https:// or unix://"),
        ("", "must start with http://, https:// or unix://"),
        ("http://", "must name a host"),
        ("http:///path", "must name a host"),
        ("https://:8443", "must name a host"),
        ("unix://engine.sock", "unix:// needs an absolute socket path"),
        ("unix:engine.sock", "unix:// needs an absolute socket path"),
    ],
)
def test_upstream_url(url: str, reason: str) -> None:
    message = config_error({"upstream": {"url": url}})
    assert message.startswith(f"upstream.url: {reason}")
    assert repr(url) in message


def test_upstream_health_path_needs_slash() -> None:
    assert config_error({"upstream": {"health_path": "health"}}) == (
        "upstream.health_path: must start with '/', got 'health'"
    )


def test_metrics_path_needs_leading_slash() -> None:
    assert config_error({"metrics": {"path": "metrics"}}) == "metrics.path: must start with '/', got 'metrics'"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/metrics"])
def test_metrics_path_must_not_shadow_a_route(path: str) -> None:
    assert config_error({"metrics": {"path": path}}) == (f"metrics.path: must not shadow a served route, got {path!r}")


# --------------------------------------------------------------------------- load


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load(missing)
    message = str(info.value)
    assert message.startswith(f"{missing}: cannot read config")
    assert "\n" not in message


def test_load_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("gate:\n  max_concurrent: 2\n  max_queue: [1, 2\nlimits: {}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert " at line 4, column " in message
    assert "\n" not in message


def test_load_tab_indentation(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("gate:\n\tmax_concurrent: 2\n")
    with pytest.raises(ConfigError, match=r"at line 2, column 1"):
        load(path)


def test_load_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load(path) == Config()


def test_load_reports_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("gate:\n  max_concurrent: 0\n")
    with pytest.raises(ConfigError, match=r"^gate\.max_concurrent: must be >= 1, got 0$"):
        load(path)


def test_shipped_config_loads_and_round_trips() -> None:
    c = load(SHIPPED)
    assert from_mapping(to_mapping(c)) == c
    # to_mapping is plain data that YAML can carry both ways.
    assert from_mapping(yaml.safe_load(yaml.safe_dump(to_mapping(c)))) == c


def test_shipped_config_is_the_defaults_in_offload_mode() -> None:
    # The shipped file runs the main job (offload in front of the reference engine); apart from
    # what that needs, it must not drift from the documented defaults.
    shipped = load(SHIPPED)
    assert shipped.upstream.mode == "offload" and shipped.preprocess.processor == "qwen2-vl"
    assert shipped.gate.max_bytes == 512 * 1024**2
    defaults = Config()
    assert shipped.server == defaults.server and shipped.limits == defaults.limits
    assert shipped.shm == defaults.shm and shipped.metrics == defaults.metrics


def test_round_trip_of_non_default_config() -> None:
    c = from_mapping(
        {
            "server": {"max_body_bytes": "3GiB"},
            "upstream": {"read_timeout_s": 9, "stream_upgrade": False},
            "limits": {"allowed_hosts": ["a.example"]},
        }
    )
    plain = to_mapping(c)
    assert plain["limits"]["allowed_hosts"] == ["a.example"]
    assert type(plain["server"]["max_body_bytes"]) is int
    assert from_mapping(plain) == c


# --------------------------------------------------------------------------- describe


def test_describe_lists_every_leaf_once_with_a_doc() -> None:
    rows = describe()
    counts = Counter(path for path, _, _ in rows)
    assert [p for p, n in counts.items() if n != 1] == []
    assert set(counts) == set(leaf_paths(to_mapping(Config())))
    for path, _, doc in rows:
        assert isinstance(doc, str)
        assert doc.strip(), f"{path} has no doc"


def test_describe_defaults_match_config() -> None:
    defaults = Config()
    for path, default, _ in describe():
        section, name = path.split(".")
        assert getattr(getattr(defaults, section), name) == default, path


# --------------------------------------------------------------------------- check-config CLI


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check-config", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_valid_prints_effective_values(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("gate:\n  max_concurrent: 5\n  max_bytes: 2GiB\nlimits:\n  allowed_hosts: [a.example]\n")
    result = check_config(str(path))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["gate"]["max_concurrent"] == 5
    assert printed["gate"]["max_bytes"] == 2 * 1024**3
    assert printed["limits"]["allowed_hosts"] == ["a.example"]
    # Effective values include the defaults of keys the file does not set.
    assert printed["server"]["port"] == 8000
    assert printed["upstream"]["mode"] == "passthrough"
    assert from_mapping(printed) == load(path)


def test_check_config_shipped_file() -> None:
    result = check_config(str(SHIPPED))
    assert result.returncode == 0, result.stderr
    assert from_mapping(yaml.safe_load(result.stdout)) == load(SHIPPED)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gate:\n  max_concurrent: 0\n", "gate.max_concurrent: must be >= 1, got 0"),
        ("gate:\n  max_concurent: 4\n", "gate.max_concurent: unknown key"),
        ("upstream:\n  url: ftp://x\n", "upstream.url: must start with"),
        ("gate:\n  max_queue: [1, 2\n", "at line 3"),
    ],
)
def test_check_config_bad_file_exits_2_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = check_config(str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = check_config(str(missing))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(missing) in lines[0]
    assert "cannot read config" in lines[0]
