# Two commands on a fresh machine: `make demo` (the whole DAG on the embedded default) and `make test`.
# Both create .venv/ and install the pinned set first (only when pyproject.toml or constraints.txt changed).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := False
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench lint format clean-runs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (see README on ROCm nodes)
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not e2e"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean-runs:
	rm -rf runs mlflow.db mlartifacts dvc-remote .airflow
