#!/usr/bin/env bash
# Download the wheels the GPU check needs on the device machine (benchmarks/gpu_wheels.txt) into
# .whl/ (git-ignored), for that machine's Python (3.12, x86-64 Linux). Run here, where PyPI is
# reachable, before `run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])`.
#   bash benchmarks/gpu_wheels.sh            # for the device (Python 3.12)
#   bash benchmarks/gpu_wheels.sh 3.11       # for a local rehearsal with this machine's Python
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r benchmarks/gpu_wheels.txt
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl/build setuptools==84.2.1 wheel==0.48.0 packaging==26.4
size=$(du -sm .whl | cut -f1)
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels, ${size} MiB in .whl/ (the tree that travels must stay under 64 MiB)"
[ "$size" -lt 40 ] || { echo "gpu_wheels: .whl/ is ${size} MiB, too large to travel beside the tree" >&2; exit 1; }
