#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): LLaMA-7B-shaped random model, default compare at k = 32.
# On the device machine, after `bash benchmarks/gpu_wheels.sh` here:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Anywhere: bash benchmarks/gpu_check.sh --dry-run
# Without a .venv (the device machine), the carried wheels in .whl/ are installed into
# /tmp/iclgd-site and iclgd-lens is built from this tree into it with the carried build backend
# (.whl/build/): no network, no dependencies resolved; the image's torch is used. Output is
# unbuffered and, where $OUT is set, also written to $OUT/gpu_check.txt, so that a run stopped
# at its time limit still returns what it printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  PY=python3
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/iclgd-site .whl/*.whl
    "$PY" -m pip install -q --no-index --find-links .whl/build --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/iclgd-site .
    export PYTHONPATH=/tmp/iclgd-site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
if [ -n "${OUT:-}" ]; then  # (pipefail, set above: the check's exit status, not tee's)
  "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.txt"
else
  exec "$PY" benchmarks/gpu_check.py "$@"
fi
