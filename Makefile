# Two entry points: `make run` and `make test`. Both create .venv on first use.
PY ?= python3
# No model hub here or in CI: everything loads from local directories.
export HF_HUB_OFFLINE := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mm-sidecar run --config config/sidecar.yaml

lint: $(STAMP)
	$(BIN)/ruff check sidecar preprocess engine tests
	$(BIN)/ruff format --check sidecar preprocess engine tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
