"""The memory ceiling printed by check-config and enforced by serve against server.memory_limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sidecar.ceiling import SIDECAR_BASE, WORKER_BASE, check_limit, memory_ceiling, per_image_peak
from sidecar.config import from_mapping


def test_terms_follow_the_config() -> None:
    c = from_mapping({"server": {"max_body_memory": "256MiB"}})
    assert [t.name for t in memory_ceiling(c).terms] == ["base", "request bodies"]
    assert memory_ceiling(c).total == SIDECAR_BASE + 256 * 1024**2

    remote = from_mapping(
        {
            "server": {"max_body_memory": "256MiB"},
            "limits": {"allow_remote_urls": True, "max_image_bytes": "3MiB"},
            "preprocess": {"max_concurrent_fetches": 4},
        }
    )
    fetches = next(t for t in memory_ceiling(remote).terms if t.name == "remote fetches")
    assert fetches.nbytes == 4 * 3 * 1024**2 * 7 // 3


def test_offload_adds_the_arena_and_the_workers() -> None:
    c = from_mapping(
        {
            "upstream": {"mode": "offload"},
            "preprocess": {"processor": "qwen2-vl", "workers": 3},
            "gate": {"max_bytes": "2GiB"},
        }
    )
    terms = {t.name: t.nbytes for t in memory_ceiling(c).terms}
    # The segment: exactly gate.max_bytes of data pages, a header page, and 8 bytes a page of table.
    assert terms["arena"] == 2 * 1024**3 + 4096 + 8 * (2 * 1024**3 // 4096)
    assert terms["workers"] == 3 * (WORKER_BASE + per_image_peak(c))
    assert per_image_peak(c) > 40_000_000 * 4  # the decoded source at limits.max_image_pixels


def test_limit_below_the_ceiling_is_refused_naming_the_terms() -> None:
    assert check_limit(from_mapping({"server": {"memory_limit": "4GiB"}})) is None
    refusal = check_limit(from_mapping({"server": {"memory_limit": "512MiB", "max_body_memory": "1GiB"}}))
    assert refusal is not None
    assert refusal.startswith("server.memory_limit=536870912 (512.0 MiB) is below the worst-case memory")
    assert "server.max_body_memory" in refusal


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args], check=False, capture_output=True, text=True, timeout=60
    )


def test_check_config_prints_the_ceiling_and_serve_refuses(tmp_path: Path) -> None:
    good = run("check-config", "config/sidecar.yaml")
    assert good.returncode == 0
    assert "# worst-case memory of the sidecar: 4.0 GiB" in good.stderr
    for term in ("base", "request bodies", "arena", "workers"):
        assert f"#  {term} " in good.stderr

    bad = tmp_path / "small.yaml"
    bad.write_text("server:\n  memory_limit: 512MiB\n")
    for args in (("check-config", str(bad)), ("serve", "--config", str(bad))):
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert "server.memory_limit=536870912 (512.0 MiB) is below the worst-case memory" in result.stderr
