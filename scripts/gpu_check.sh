#!/usr/bin/env bash
# The GPU check (bench/benchmarks/gpu_check.py) on a CUDA machine that has only torch, transformers,
# torchmetrics and accelerate: installs the carried wheels offline, then runs the check (< 8 min).
#
#   bash scripts/gpu_check.sh wheels     # here, with PyPI: download the wheels into wheels/ (gitignored)
#   bash scripts/gpu_check.sh [ARGS]     # there: pip install --no-index --find-links wheels/, then run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [[ ${1:-} == wheels ]]; then
  mkdir -p wheels
  for v in 3.10 3.11 3.12 3.13; do  # the GPU image's Python is not known in advance
    "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
      --python-version "$v" -d wheels -r scripts/gpu_wheels.txt || echo "(no wheels for Python $v)"
  done
  du -sh wheels
  exit 0
fi
missing=$("$PY" - <<'PY'
import importlib.util, re
names = {"pillow": "PIL"}
for line in open("scripts/gpu_wheels.txt"):
    req = line.split("#")[0].strip()
    if req:
        pkg = re.split("[=<>]", req)[0]
        if importlib.util.find_spec(names.get(pkg, pkg)) is None:
            print(req)
PY
)
if [[ -n $missing ]]; then
  "$PY" -m pip install --no-index --find-links wheels/ $missing
fi
exec "$PY" -m bench.benchmarks.gpu_check "$@"
