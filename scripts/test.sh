#!/usr/bin/env bash
# Set up, lint, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet detr tests benchmarks examples
set +e
# Three worker processes, one test file each at a time (a file's fixtures stay in one worker). The
# tests are single-threaded but many wait on subprocesses (CLI, servers, torchrun ranks, Chromium), so
# on 2 cores a third worker fills those waits: the cores were 99 % busy, and one run took 820 s against
# 924 s with two workers (2026-12-03, each alone on the machine).
.venv/bin/python -m pytest -n "${DETR_TEST_WORKERS:-3}" --dist loadfile --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
