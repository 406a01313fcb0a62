#!/usr/bin/env bash
# A CUDA 13.0 build toolchain for `cargo build --features cuda` on a machine with no GPU and no
# system CUDA, from pinned PyPI wheels, for an H100/H200 (sm_90, driver 580+).
#   usage: source <(scripts/cuda-toolchain.sh [DIR])        DIR default: ~/.cache/concierge-cuda-13.0
# Prints the variables to export. Installs, once, into DIR:
#   tk/    nvcc, ptxas, cicc, headers (nvidia-cuda-nvcc, -runtime, -cccl, -crt, nvidia-nvvm, all
#          13.0: an unpinned nvidia-nvvm is 13.5, whose PTX the 13.0 ptxas refuses);
#   libs/  cuBLAS(Lt), cuRAND and NVRTC 13.0 for the linker;
#   link/  unversioned names of those for `-l`, and a stub libcuda.so (SONAME libcuda.so.1) that
#          defines every driver entry point of cuda.h, for linking: at run time the driver's
#          real libcuda.so.1 is loaded. Each stub function returns CUDA_ERROR_STUB_LIBRARY (34),
#          as NVIDIA's own stub does, so a binary run against it here (LD_LIBRARY_PATH=link/,
#          which also names it libcuda.so.1) finds "no driver" at cuInit, not garbage.
# What matters to the build: PATH (nvcc), CUDA_ROOT, CUDA_COMPUTE_CAP (90 -> sm_90a) and
# LIBRARY_PATH; CUDAFORGE_THREADS sets how many kernels nvcc compiles at once.
set -euo pipefail
DIR=${1:-$HOME/.cache/concierge-cuda-13.0}
pip_into() { local into=$1; shift; python3 -m pip install --quiet --no-deps --target "$into" "$@" >&2; }
if [ ! -x "$DIR/tk/nvidia/cu13/bin/nvcc" ]; then
  pip_into "$DIR/tk" "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
fi
if [ ! -e "$DIR/libs/nvidia/cu13/lib/libcublas.so.13" ]; then
  pip_into "$DIR/libs" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*"
fi
ROOT=$DIR/tk/nvidia/cu13
LIBS=$DIR/libs/nvidia/cu13/lib
LINK=$DIR/link
if [ ! -e "$LINK/libcuda.so" ] || ! grep -q 'return 34' "$LINK/stub.c" 2>/dev/null; then
  mkdir -p "$LINK"
  # Every cu* function cuda.h declares (and its _v2/_ptsz variants), returning 34.
  { grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "$ROOT/include/cuda.h" | sed 's/\s*(//'
    grep -oE '\bcu[A-Z][A-Za-z0-9]*_v[0-9]+(_ptsz|_ptds)?\b' "$ROOT/include/cuda.h"; } \
    | sort -u | awk '{ print "int " $1 "(void) { return 34; }" }' > "$LINK/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/stub.c"
  for pair in "cublas:$LIBS/libcublas.so.13" "cublasLt:$LIBS/libcublasLt.so.13" "curand:$LIBS/libcurand.so.10" \
              "nvrtc:$LIBS/libnvrtc.so.13" "cudart:$ROOT/lib/libcudart.so.13"; do
    ln -sf "${pair#*:}" "$LINK/lib${pair%%:*}.so"
  done
fi
[ -e "$LINK/libcuda.so.1" ] || ln -s libcuda.so "$LINK/libcuda.so.1"
cat <<ENV
export CUDA_ROOT=$ROOT CUDA_PATH=$ROOT CUDA_HOME=$ROOT
export PATH=$ROOT/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-$(nproc)}
export LIBRARY_PATH=$LINK:$ROOT/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
ENV
