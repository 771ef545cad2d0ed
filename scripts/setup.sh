#!/usr/bin/env bash
# Creates .venv and installs PyTorch (pinned CPU-compatible 2.13.0) and detr with its
# dependencies. Idempotent: a stamp keyed on pyproject.toml skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.detr-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch is pinned first and on its own line so nothing can pull an unpinned (CUDA) build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e ".[test,serve,export]"
  echo "$want" > "$stamp"
fi
