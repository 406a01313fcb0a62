#!/usr/bin/env bash
# Builds the CUDA test binaries of the kernels crate here (no GPU needed) and packs them into
# cuda-bin/device-check/ (git-ignored) for scripts/device-check.sh to run on a GPU machine that
# has no Rust toolchain: stripped, gzip-compressed (gzip is on every machine), under the 64 MiB a
# device run may carry.
#   usage: scripts/build-device-check.sh        CUDA_COMPUTE_CAP=90 by default (H100/H200)
# Uses CARGO_TARGET_DIR if set. With no CUDA toolkit on PATH it sets up the pip toolchain
# (scripts/cuda-toolchain.sh), as scripts/build-cuda.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null && [ -z "${CUDA_ROOT:-}" ]; then
  source <(scripts/cuda-toolchain.sh)
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "building with $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP" >&2
# The test executables cargo built, one path a line (from its JSON messages).
exes=$(cargo test --release --features cuda -p concierge-kernels --test gpu --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
out=cuda-bin/device-check
rm -rf "$out" && mkdir -p "$out"
for exe in $exes; do
  name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
  strip -o "$out/$name" "$exe"
  gzip -9 "$out/$name"
done
echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')" > "$out/BUILD"
ls -l "$out" >&2
total=$(du -sb "$out" | cut -f1)
echo "total $((total / 1024 / 1024)) MiB (limit 64 MiB)" >&2
[ "$total" -lt $((64 * 1024 * 1024)) ] || { echo "too large to carry" >&2; exit 1; }
