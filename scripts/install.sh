#!/usr/bin/env bash
# Create (or reuse) the project venv and link it as ./.venv.
# The venv lives outside the clone, keyed by a hash of the requirements files, so reruns are fast.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ="${SDBENCH_REQUIREMENTS:-requirements.txt}"
HASH=$(cat requirements*.txt scripts/install.sh | sha256sum | cut -c1-16)
CACHE="${SDBENCH_VENV_CACHE:-$HOME/.cache/sdbench}"
VENV="$CACHE/venv-$(basename "$REQ" .txt)-$HASH"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  echo "installing venv into $VENV (a few minutes, ~6 GB)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$REQ"
  touch "$VENV/.complete"
fi
ln -sfn "$VENV" .venv
echo "venv ready: .venv -> $VENV" >&2
