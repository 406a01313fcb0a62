#!/usr/bin/env bash
# Remakes the committed intent checkpoints with `concierge train-intent` (CPU; ~20 min each on a
# 2-core machine). Data paths are arguments: Banking77's train.csv and CLINC150's data_full.json
# (both ship in ../shared/data in this project's CI; see README "Intents" for their sources).
#
#   scripts/train-intents.sh [BANKING77_CSV] [CLINC150_JSON]
#
# Writes checkpoints/intents-en-clinc150 (the server's default),
# checkpoints/intents-en-banking77 and, on all-mpnet-base-v2 (scripts/fetch-mpnet.sh; 40-55 min
# each on 2 cores), checkpoints/intents-en-clinc150-mpnet and
# checkpoints/intents-en-banking77-mpnet, each: intent_config.json (labels, handoff threshold,
# training log and scores), model.safetensors (the fine-tuned top layers in f16 — two for
# CLINC150 and MPNet's Banking77, three for MiniLM's Banking77 — and the head in f32), encoder_config.json. Seeded: the same data and binary give the same weights on one machine (on another, runs can differ).
set -euo pipefail
cd "$(dirname "$0")/.."
BANKING77=${1:-../shared/data/banking77/train.csv}
CLINC150=${2:-../shared/data/clinc150/data_full.json}
for f in "$BANKING77" "$CLINC150"; do
  [ -f "$f" ] || { echo "missing $f: pass the data paths as arguments" >&2; exit 2; }
done
[ -f model-store/all-MiniLM-L6-v2/model.safetensors ] || scripts/fetch-default-model.sh
[ -f model-store/all-mpnet-base-v2/model.safetensors ] || scripts/fetch-mpnet.sh
cargo build --release -p concierge-server
BIN=target/release/concierge
# CLINC150: its own train (+ oos_train as label "oos"), val (model selection, calibration) and
# test splits; test figures are printed at the end and stored in intent_config.json.
"$BIN" train-intent --format clinc150 --train "$CLINC150" --out checkpoints/intents-en-clinc150 \
  --train-layers 2 --epochs 4 --lr 1e-4 --head-lr 2e-3 --seed 13
# Banking77: a seeded, per-label 10% of train.csv held out as the dev split.
"$BIN" train-intent --format banking77 --train "$BANKING77" --out checkpoints/intents-en-banking77 \
  --train-layers 3 --epochs 6 --lr 1.5e-4 --head-lr 2e-3 --seed 13
# CLINC150 on all-mpnet-base-v2: its top two layers (of 12) fine-tuned, the same recipe.
"$BIN" train-intent --format clinc150 --train "$CLINC150" --out checkpoints/intents-en-clinc150-mpnet \
  --encoder-dir model-store/all-mpnet-base-v2 --train-layers 2 --epochs 4 --lr 1e-4 --head-lr 2e-3 --seed 13
# Banking77 on all-mpnet-base-v2: two layers, eight epochs (five left it still rising: 93.73%).
"$BIN" train-intent --format banking77 --train "$BANKING77" --out checkpoints/intents-en-banking77-mpnet \
  --encoder-dir model-store/all-mpnet-base-v2 --train-layers 2 --epochs 8 --lr 1e-4 --head-lr 2e-3 --seed 13
