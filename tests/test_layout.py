"""The package rule: sidecar -> preprocess <- engine, and only mm_sidecar (the composition root) knows both.

Checked from the source (every import statement, function-local ones included), so a lazy import
inside a command cannot slip the sidecar a dependency on the engine again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"sidecar", "preprocess", "engine", "mm_sidecar"}
ALLOWED = {
    "sidecar": {"sidecar", "preprocess"},
    "preprocess": {"preprocess"},
    "engine": {"engine", "preprocess"},
    "mm_sidecar": OURS,
}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_the_rule_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(ROOT)): imported_packages(f) - ALLOWED[package] for f in files}
    assert {f: p for f, p in wrong.items() if p} == {}
