#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): LLaMA-7B-shaped random model, default compare at k = 32.
# On the device machine: bash benchmarks/gpu_check.sh       Anywhere: bash benchmarks/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_check.py "$@"
