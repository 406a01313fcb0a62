#!/usr/bin/env bash
# Builds the CUDA server binary and strips it into cuda-bin/concierge (git-ignored; 71 MB, 23 MB
# gzipped, to carry to a GPU machine). With a CUDA toolkit installed (nvcc on PATH or CUDA_ROOT
# set) it uses that; otherwise it sets up scripts/cuda-toolchain.sh's pip toolchain first.
#   usage: scripts/build-cuda.sh [--with-benches] [--compress]
#          CUDA_COMPUTE_CAP=90 by default (H100/H200). --with-benches also builds the GPU
#          benchmark's binaries (cuda-bin/encoder-bench, cuda-bin/grpc-load; scripts/gpu-bench.sh
#          runs them); --compress writes .zst copies (zstd -19) to carry under a size limit.
# Run time needs the driver's libcuda.so.1 and libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libcudart.so.13, libnvrtc.so.13 on LD_LIBRARY_PATH (an RPATH is not enough:
# NVRTC opens its builtins library by name). Where they come from pip's nvidia-* wheels (e.g. in
# PyTorch's environment):
#   export LD_LIBRARY_PATH=$(python3 -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib")
#     for p in nvidia.__path__ for d in os.listdir(p) if os.path.isdir(os.path.join(p, d, "lib"))))')
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null && [ -z "${CUDA_ROOT:-}" ]; then
  source <(scripts/cuda-toolchain.sh)
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
echo "building with $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP" >&2
with_benches=0; compress=0
for a in "$@"; do
  case "$a" in
    --with-benches) with_benches=1 ;;
    --compress) compress=1 ;;
    *) echo "build-cuda: unknown option $a (--with-benches, --compress)" >&2; exit 2 ;;
  esac
done
cargo build --release --features cuda -p concierge-server --bin concierge
mkdir -p cuda-bin
strip -o cuda-bin/concierge "${CARGO_TARGET_DIR:-target}/release/concierge"
if [ $with_benches = 1 ]; then
  # cargo prints each built bench's executable path; the names carry a hash.
  for bench in encoder grpc_load; do
    exe=$(cargo bench --no-run --features cuda -p concierge-benches --bench "$bench" --message-format=json 2>/dev/null \
      | python3 -c 'import json,sys; print([j["executable"] for j in map(json.loads, sys.stdin) if j.get("executable")][-1])')
    strip -o "cuda-bin/$(echo $bench | tr _ - | sed 's/^encoder$/encoder-bench/')" "$exe"
  done
fi
if [ $compress = 1 ]; then
  for f in cuda-bin/*; do
    case "$f" in *.zst) continue ;; esac
    zstd -19 -T0 -qf "$f" -o "$f.zst"
  done
fi
ls -l cuda-bin >&2
echo "needs at run time:" >&2
readelf -d cuda-bin/concierge | grep NEEDED >&2
true
