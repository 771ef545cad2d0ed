#!/usr/bin/env bash
# The main job: set up, make the toy English→German corpus, train a small translator
# (a few minutes on 2 CPU cores), translate a few sentences and score the test set.
# Re-running continues or reuses runs/demo (--resume) instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
detr=.venv/bin/detr
$detr data toy --to data/toy >/dev/null
$detr train configs/tiny.yaml --run_dir runs/demo --train.max_steps 1500 --resume
echo "--- translations of the first test sentences (greedy | beam 4):"
head -n 5 data/toy/test.en > runs/demo/sample.en
$detr translate runs/demo --beam-size 1 -i runs/demo/sample.en | paste runs/demo/sample.en - | sed 's/\t/  =>  /'
$detr translate runs/demo --beam-size 4 -i runs/demo/sample.en
echo "--- test set:"
$detr evaluate runs/demo --src data/toy/test.en --ref data/toy/test.de --beam-size 4
