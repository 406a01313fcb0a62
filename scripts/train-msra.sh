#!/usr/bin/env bash
# Remakes checkpoints/entities-zh-msra, the Chinese entity tagger: a character BiLSTM-CRF with
# character-bigram embeddings (50 wide, bigrams seen 5+ times) on MSRA NER, CPU. Two runs of
# `concierge train-tagger`: 2 epochs from a seeded start, then up to 3 more from that checkpoint
# (`--init`; the best dev epoch is kept, its embedding tables stored in f16). About 40 minutes on
# a quiet 2-core machine. Seeded: the same data and binary give the same weights.
#
#   scripts/train-msra.sh [MSRA_TRAIN] [MSRA_TEST] [OUT]
#
# Defaults: model-store/data/msra/msra_{train,test}.txt (fetched by scripts/fetch-tagger-data.sh,
# which scripts/fetch-default-model.sh runs) and checkpoints/entities-zh-msra. Test figures are
# printed at the end and stored in OUT/training.json.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${1:-model-store/data/msra/msra_train.txt}
TEST=${2:-model-store/data/msra/msra_test.txt}
OUT=${3:-checkpoints/entities-zh-msra}
[ -f "$TRAIN" ] && [ -f "$TEST" ] || scripts/fetch-tagger-data.sh
cargo build --release -p concierge-server --bin concierge
BIN=${CARGO_TARGET_DIR:-target}/release/concierge
COMMON=(--format msra --train "$TRAIN" --test "$TEST" --batch 128 --lr 5e-3 --dev-fraction 0.02
  --length-buckets --bigram-dim 50 --bigram-min-count 5 --patience 3 --seed 13)
FIRST=$(mktemp -d)
trap 'rm -rf "$FIRST"' EXIT
"$BIN" train-tagger "${COMMON[@]}" --out "$FIRST" --epochs 2
"$BIN" train-tagger "${COMMON[@]}" --init "$FIRST" --out "$OUT" --epochs 3 --embeddings-f16
