"""README stays true: every config key and every exported metric is documented there."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from sidecar.config import describe
from sidecar.metrics import Metrics

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_config_key_is_in_the_readme_reference() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", README, re.MULTILINE))
    keys = {path for path, _, _ in describe()}
    assert keys == documented


def test_every_metric_is_in_the_readme() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    names = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    documented = set(re.findall(r"^\| `(mm_sidecar_[a-z_]+)", README, re.MULTILINE))
    assert names == documented


def test_readme_starts_with_the_two_commands() -> None:
    head = README.split("\n## ", 1)[0]
    assert "make run" in head and "make test" in head
