#!/usr/bin/env bash
# Remakes checkpoints/entities-zh-msra, the Chinese entity tagger: a character BiLSTM-CRF with
# character-bigram embeddings (50 wide, bigrams seen 5+ times) on MSRA NER, its character table
# started from Baidu LAC's pretrained vectors, and Baidu LAC's pretrained character BiGRU (both
# from model-store/data/lac, from jieba's sdist) as contextual features, CPU. Three runs of
# `concierge train-tagger`, each keeping its best dev epoch: 2 epochs from a seeded start with
# LAC frozen; 3 more from that checkpoint (`--init`) fine-tuning LAC with the tagger
# (`--lac-train`, LAC's learning rate 1e-3); then 2 more at lower learning rates (2e-3, LAC
# 5e-4); embedding tables stored in f16. About 100 minutes on a quiet 2-core machine. Seeded:
# the same data and binary give the same weights.
#
#   scripts/train-msra.sh [MSRA_TRAIN] [MSRA_TEST] [OUT]
#
# With WORD_VECTORS set to a word2vec file (model-store/data/synonyms/words.vector, fetched by
# scripts/fetch-word-vectors.sh), every stage also reads the word-vector lexicon
# (`--word-vectors`; benches/RESULTS.md measures it).
#
# Defaults: model-store/data/msra/msra_{train,test}.txt and model-store/data/lac (fetched
# by scripts/fetch-tagger-data.sh, which scripts/fetch-default-model.sh runs), and
# checkpoints/entities-zh-msra. Test figures are printed at the end and stored in
# OUT/training.json.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${1:-model-store/data/msra/msra_train.txt}
TEST=${2:-model-store/data/msra/msra_test.txt}
OUT=${3:-checkpoints/entities-zh-msra}
VECTORS=model-store/data/lac
[ -f "$TRAIN" ] && [ -f "$TEST" ] && [ -f "$VECTORS/model_baseline/gru_0.w_0" ] || scripts/fetch-tagger-data.sh
cargo build --release -p concierge-server --bin concierge
BIN=${CARGO_TARGET_DIR:-target}/release/concierge
COMMON=(--format msra --train "$TRAIN" --test "$TEST" --batch 128 --dev-fraction 0.02
  --length-buckets --bigram-dim 50 --bigram-min-count 5 --char-vectors "$VECTORS" --lac "$VECTORS"
  --patience 3 --seed 13)
if [ -n "${WORD_VECTORS:-}" ]; then
  [ -f "$WORD_VECTORS" ] || { echo "WORD_VECTORS=$WORD_VECTORS: no such file (scripts/fetch-word-vectors.sh fetches it)" >&2; exit 1; }
  COMMON+=(--word-vectors "$WORD_VECTORS")
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$BIN" train-tagger "${COMMON[@]}" --out "$WORK/first" --epochs 2 --lr 5e-3
"$BIN" train-tagger "${COMMON[@]}" --init "$WORK/first" --out "$WORK/second" --epochs 3 --lr 5e-3 \
  --lac-train --lac-lr 1e-3 --embeddings-f16
"$BIN" train-tagger "${COMMON[@]}" --init "$WORK/second" --out "$OUT" --epochs 2 --lr 2e-3 \
  --lac-train --lac-lr 5e-4 --embeddings-f16
