"""What every benchmark module shares: where the repository is, and byte units.

Each concept has a module of its own: `services` (processes), `memory` (sampling), `cpu` (placement
and load), `images`, `client` (requests and outcomes), `stats` (statistics, table cells), `report`
(command line, RESULTS.md, plots).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
GiB = 1 << 30
MiB = 1 << 20
