#!/usr/bin/env bash
# The main job: set up, then build a small model from configs/ and run it.
# (Grows into "train a small translator, then translate" as training and decoding land.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/detr --version
.venv/bin/detr model configs/tiny.yaml
.venv/bin/detr model base --set model.src_vocab_size=37000 --set model.tgt_vocab_size=37000 \
  --set model.share_embeddings=true
