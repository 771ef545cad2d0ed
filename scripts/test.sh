#!/usr/bin/env bash
# Set up, lint, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet detr tests benchmarks examples
set +e
# Two worker processes, one test file each at a time (a file's fixtures stay in one worker): the
# suite's tests are single-threaded, so on 2 cores this takes about 60% of a serial run.
.venv/bin/python -m pytest -n "${DETR_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
