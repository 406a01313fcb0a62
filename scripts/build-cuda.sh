#!/usr/bin/env bash
# Builds the CUDA server binary and strips it into cuda-bin/concierge (git-ignored; 71 MB, 23 MB
# gzipped, to carry to a GPU machine). With a CUDA toolkit installed (nvcc on PATH or CUDA_ROOT
# set) it uses that; otherwise it sets up scripts/cuda-toolchain.sh's pip toolchain first.
#   usage: scripts/build-cuda.sh            CUDA_COMPUTE_CAP=90 by default (H100/H200)
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
cargo build --release --features cuda -p concierge-server --bin concierge
mkdir -p cuda-bin
strip -o cuda-bin/concierge "${CARGO_TARGET_DIR:-target}/release/concierge"
ls -l cuda-bin/concierge >&2
echo "needs at run time:" >&2
readelf -d cuda-bin/concierge | grep NEEDED >&2
