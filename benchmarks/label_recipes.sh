#!/usr/bin/env bash
# Train and score the classification / NER recipes one after another (2 CPU cores: hours).
# Logs and reports go to runs/logs/NAME.log; the numbers go into benchmarks/RESULTS.md by hand.
#   bash benchmarks/label_recipes.sh fpb_minilm sst2_minilm conll2003_minilm sst2 conll2003
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/logs
for name in "$@"; do
  config=configs/$name.yaml
  test=$(.venv/bin/python -c "import detr; print(detr.load_config('$config').data.test)")
  log=runs/logs/$name.log
  { echo "== $(date -u) train $config on $(nproc) cores"
    /usr/bin/time -f "train wall %e s" .venv/bin/detr train "$config" --resume --no-progress
    echo "== test $test"
    .venv/bin/detr evaluate "runs/$name" --data "$test"
  } > "$log" 2>&1
  tail -n 25 "$log"
done
