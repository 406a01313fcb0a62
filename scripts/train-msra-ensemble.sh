#!/usr/bin/env bash
# Remakes checkpoints/entities-zh-msra-ensemble, the Chinese ensemble tagger: six character
# taggers, each made by scripts/train-msra.sh (the committed schedule and its dev split) with
# its own seeds (the default, and `--run-seed` 14 to 18), assembled by `concierge
# ensemble-tagger` into one checkpoint that votes by posteriors (`--vote marginals`: the mean
# of the members' CRF marginals, decoded by constrained Viterbi), members' weights in f16, the
# shared frozen parts (char BERT, word vectors) stored once. About 13 hours on a quiet 2-core
# machine (6 x about 2 h 15; the committed one: dev F1 95.20, test F1 93.21). Seeded: the same data and binary give the same weights on one machine
# (on another, runs can differ; benches/RESULTS.md).
#
#   scripts/train-msra-ensemble.sh [MSRA_TRAIN] [MSRA_TEST] [OUT]
#
# MEMBERS_DIR: keep the members there (default: a temporary folder, removed); a member whose
# folder already holds a model.safetensors is not trained again, so an interrupted run resumes.
# EPOCHS, NAME_LISTS, CHAR_BERT, WORD_VECTORS, CONCIERGE_BIN: as scripts/train-msra.sh.
# Defaults: model-store/data/msra/msra_{train,test}.txt and checkpoints/entities-zh-msra-ensemble.
# The ensemble's dev F1 (on the 2% the members held out of MSRA_TRAIN) and test F1 are printed
# and stored in OUT/training.json.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${1:-model-store/data/msra/msra_train.txt}
TEST=${2:-model-store/data/msra/msra_test.txt}
OUT=${3:-checkpoints/entities-zh-msra-ensemble}
[ -f "$TRAIN" ] && [ -f "$TEST" ] || scripts/fetch-tagger-data.sh
if [ -z "${CONCIERGE_BIN:-}" ]; then
  cargo build --release -p concierge-server --bin concierge
  CONCIERGE_BIN=$(realpath "${CARGO_TARGET_DIR:-target}/release/concierge")
fi
export CONCIERGE_BIN
if [ -n "${MEMBERS_DIR:-}" ]; then
  WORK=$MEMBERS_DIR
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
MEMBERS=()
for seed in default 14 15 16 17 18; do
  dir=$WORK/member-$seed
  if [ ! -f "$dir/model.safetensors" ]; then
    extra=()
    [ "$seed" = default ] || extra=(--run-seed "$seed")
    scripts/train-msra.sh "$TRAIN" "$TEST" "$dir" -- "${extra[@]}"
  fi
  MEMBERS+=(--member "$dir")
done
"$CONCIERGE_BIN" ensemble-tagger "${MEMBERS[@]}" --out "$OUT" --f16 --vote marginals \
  --format msra --train "$TRAIN" --test "$TEST"
