#!/usr/bin/env bash
# Remakes the English ensemble tagger: five BiLSTM-CRF taggers over all-MiniLM-L6-v2's layers
# 3-6 (the default tagger's settings), each trained on every ATIS train_dev sentence (no dev
# hold-out: `--dev-fraction 0`) for 15 epochs with its own seed (13-17), assembled by
# `concierge ensemble-tagger` into one checkpoint that tags by the mean of the members' path
# scores, weights in f16. 15 epochs: the single tagger's best dev epoch was 14 of 15. About
# 45 minutes on a quiet 2-core machine (5 x ~9). Seeded: the same data and binary give the
# same weights on one machine (on another, runs can differ).
#
#   scripts/train-atis-ensemble.sh [ATIS_TRAIN] [ATIS_TEST] [OUT]
#
# Defaults: model-store/data/atis/{train_dev,test} (fetched by scripts/fetch-tagger-data.sh,
# which scripts/fetch-default-model.sh runs) and checkpoints/entities-en-atis-ensemble. Each
# member's test F1 and the ensemble's are printed and stored in OUT/training.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/training-malloc.sh # allocator settings: 10-20% faster training
TRAIN=${1:-model-store/data/atis/train_dev}
TEST=${2:-model-store/data/atis/test}
OUT=${3:-checkpoints/entities-en-atis-ensemble}
[ -f "$TRAIN" ] && [ -f "$TEST" ] || scripts/fetch-tagger-data.sh
[ -f model-store/all-MiniLM-L6-v2/model.safetensors ] || scripts/fetch-default-model.sh
cargo build --release -p concierge-server --bin concierge
BIN=${CARGO_TARGET_DIR:-target}/release/concierge
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MEMBERS=()
for seed in 13 14 15 16 17; do
  "$BIN" train-tagger --format atis --train "$TRAIN" --test "$TEST" --out "$WORK/seed$seed" \
    --encoder-layers 3,4,5,6 --epochs 15 --dev-fraction 0 --batch 64 --lr 3e-3 --seed "$seed" --quiet
  MEMBERS+=(--member "$WORK/seed$seed")
done
"$BIN" ensemble-tagger "${MEMBERS[@]}" --out "$OUT" --f16 --test "$TEST" --format atis
