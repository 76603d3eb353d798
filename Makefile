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

# `make airflow`: the Airflow services (UI on http://127.0.0.1:8080) until Ctrl-C; see README.
.PHONY: setup airflow demo test test-fast bench lint format clean-runs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build (see README on ROCm nodes)
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	# cpu: the CPU ONNX Runtime (exactly one runtime extra per venv); s3, celery, kubernetes: what the
	# tests run for real (a loopback S3 server, CeleryExecutor on PostgreSQL + Redis, the pod models);
	# harness: lm-evaluation-harness, which the default gate runs (eval.harness_tasks)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,cpu,s3,celery,kubernetes,slack,harness]'
	touch $(STAMP)

setup: $(STAMP)

airflow: $(STAMP)
	$(BIN)/python -m scripts.services

demo: $(STAMP)
	$(BIN)/python -m scripts.demo

# The training and champion-gate tests and the Airflow e2e good and sabotaged runs (a decisive gate pass,
# a real failure) run a second time as the other kind of CPU (bf16 capability flipped with
# QA_LORA_CPU_BF16), so both precision paths stay green on every machine (README).
OTHER_CPU = $$($(BIN)/python -c "from tasks.plumbing.device import detect_capabilities as d; print(0 if d('cpu').bf16_native else 1)")

# Two test processes (pytest-xdist) where the machine has two CPUs or more (TEST_WORKERS=0: one process,
# no xdist). Most of the suite is single-threaded Python (process start-up, imports, graph tracing, the
# services' polling): on 2 cores the first pass takes ~15 min instead of 27. Each worker and its
# subprocesses run on their own share of the CPUs, so timings taken side by side in one worker (the
# export's serving cost) do not measure the other worker's load. tests/conftest.py groups the units.
TEST_WORKERS ?= $(shell [ "$$(nproc)" -ge 2 ] && echo 2 || echo 0)
PARALLEL = -n $(TEST_WORKERS) --no-loadscope-reorder

# The tiny base is built (or reused) first, on all CPUs: inside the suite, the worker that builds it runs
# pinned to one CPU and the other worker's tests wait for it (2026-12-03, AVX2-only EPYC: base 151 s on
# 2 cores; the reliability journey that built it pinned took 477 s).
test: $(STAMP)
	$(BIN)/qa-lora base
	$(BIN)/python -m pytest $(PARALLEL)
	QA_LORA_CPU_BF16=$(OTHER_CPU) $(BIN)/python -m pytest $(PARALLEL) -m slow tests/model/test_train.py \
	  tests/model/test_gate_champion.py tests/e2e/test_airflow_e2e.py -k "not sweep"

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(PARALLEL) -m "not slow and not e2e"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean-runs:
	rm -rf runs mlflow.db mlartifacts dvc-remote .airflow
