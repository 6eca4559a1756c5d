# make run   - set up .venv if missing, restore the data snapshot, run the whole pipeline (dvc repro)
# make test  - the test suite (offline, CPU)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin

# Offline, quiet, steady CPU timings; the venv's bin first so dvc stages and `mlflow models serve` find it.
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export OMP_NUM_THREADS ?= 2
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run setup test test-fast lint format ui status unsloth-test bench clean

run: setup
	medlora restore
	dvc repro
	dvc status
	medlora status

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: setup
	OMP_NUM_THREADS=1 pytest -q

test-fast: setup
	OMP_NUM_THREADS=1 pytest -q -m "not slow"

lint: setup
	ruff check src tests pipelines benchmarks
	ruff format --check src tests pipelines benchmarks
	lint-imports

format: setup
	ruff format src tests pipelines benchmarks
	ruff check --fix src tests pipelines benchmarks

# A moved or copied project first points its store's recorded artifact paths at its own mlruns/ (tracking.py);
# no job-runner workers (MLflow starts 7 idle ones by default, for UI features this project does not use).
ui: setup
	python -c 'from medlora.core.tracking import relocate_store; relocate_store("mlruns")'
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///$(abspath mlruns)/mlflow.db \
	  --default-artifact-root $(abspath mlruns)/artifacts --host 127.0.0.1 --port 5000

status: setup
	dvc status
	medlora status

unsloth-test: setup
	bash scripts/unsloth_env.sh

bench: setup
	OMP_NUM_THREADS=1 python benchmarks/data_throughput.py
	OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py
	OMP_NUM_THREADS=1 python benchmarks/train_throughput.py
	OMP_NUM_THREADS=1 python benchmarks/train_settings.py
	OMP_NUM_THREADS=1 python benchmarks/merge_memory.py
	OMP_NUM_THREADS=1 python benchmarks/mamba_chunk_size.py

clean:
	rm -rf outputs reports .pytest_cache
