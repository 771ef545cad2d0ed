#!/usr/bin/env bash
# Set up, lint, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet detr tests benchmarks examples
set +e
# Three worker processes, one test file each at a time (a file's fixtures stay in one worker). The
# tests are single-threaded but many wait on subprocesses (CLI, servers, torchrun ranks, Chromium), so
# on 2 cores a third worker fills those waits: the cores were 97-99 % busy (2026-12-03, alone on the
# machine; two runs took 820 and 927 s against 924 s with two workers, on a machine that drifts that much).
.venv/bin/python -m pytest -n "${DETR_TEST_WORKERS:-3}" --dist loadfile --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
