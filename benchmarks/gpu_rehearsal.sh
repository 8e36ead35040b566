#!/usr/bin/env bash
# Rehearse the GPU check's device run here, on the CPU: a scratch venv stands in for the device
# image (torch 2.13.0 CPU; the image's other packages that requirements.lock pins, at the lock's
# versions; transformers, huggingface_hub and tokenizers at the image's older versions, which the
# carried wheels must shadow), the wheels are downloaded for this Python (3.11), and a copy of the
# tree with no .venv runs `bash benchmarks/gpu_check.sh --dry-run` through its device branch
# (install the carried wheels, build iclgd-lens from the tree, run). Needs PyPI; about 2 minutes.
#   bash benchmarks/gpu_rehearsal.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3.11 -m venv "$work/image"
"$work/image/bin/pip" install -q "pip==26.3"
"$work/image/bin/pip" install -q torch==2.13.0
"$work/image/bin/python" - "$root" > "$work/image.txt" <<'PY'
import re, sys
from pathlib import Path
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
root = Path(sys.argv[1])
image = {norm(l) for l in (root / "benchmarks/gpu_image_packages.txt").read_text().split() if not l.startswith("#")}
image -= {"torch", "transformers", "huggingface-hub", "tokenizers"}
for line in (root / "requirements.lock").read_text().splitlines():
    name = line.split("==")[0].strip()
    if "==" in line and not line.startswith("#") and norm(name) in image:
        print(line.strip())
PY
"$work/image/bin/pip" install -q --no-deps -r "$work/image.txt" transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2
mkdir "$work/tree"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$work/tree"
cd "$work/tree"
bash benchmarks/gpu_wheels.sh 3.11
rm -rf /tmp/iclgd-site
mkdir "$work/out"
PATH="$work/image/bin:$PATH" OUT="$work/out" bash benchmarks/gpu_check.sh --dry-run
grep -q "^small_fp32_cpu_vs_cpu_max_diff:" "$work/out/gpu_check.txt"
grep -q "transformers 5.23.0, transformer-lens 4.3.0" "$work/out/gpu_check.txt"
echo "gpu_rehearsal: the device branch ran; its output was written to \$OUT/gpu_check.txt"
