#!/usr/bin/env bash
# The production path on a CUDA machine in minutes: the replica of Nemotron-3-Nano-30B-A3B through `dvc repro` with
# the production params (bf16, Mamba kernels, device map, adamw_8bit), ending with one JSON line of what held.
#   bash scripts/gpu_check.sh [--size tiny|small|medium] [--keep DIR] [--dry-run]
# Exit 0: everything held; 1: a stage failed or a check did not hold; 3: no CUDA device here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m medlora.gpu_check "$@"
