#!/usr/bin/env bash
# Runs the kernels crate's GPU tests (GPU against CPU on fresh random inputs, outputs poisoned
# first) on a machine with an NVIDIA GPU and driver, from the binaries that
# scripts/build-device-check.sh packed into cuda-bin/device-check/. Needs no Rust toolchain and
# no network: the CUDA 13 run-time libraries come from the pip `nvidia-*` packages of the
# machine's Python (PyTorch's environment), the driver's libcuda.so.1 from the system.
#   usage (from the repository root): scripts/device-check.sh [PYTHON]     PYTHON default python3
# Prints each test's output (a test with no usable GPU prints a line starting SKIPPED:) and
# exits non-zero if any test failed or if every test skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
dir=cuda-bin/device-check
[ -d "$dir" ] || { echo "no $dir: run scripts/build-device-check.sh where Rust is, and carry cuda-bin/" >&2; exit 2; }
echo "== build: $(cat "$dir/BUILD" 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv 2>&1 | sed 's/^/== gpu: /'
libs=$("$PY" -c 'import nvidia, os; print(":".join(os.path.join(p, d, "lib")
  for p in nvidia.__path__ for d in os.listdir(p) if os.path.isdir(os.path.join(p, d, "lib"))))' 2>/dev/null) \
  || { echo "$PY has no nvidia-* packages: set LD_LIBRARY_PATH to the CUDA 13 libraries yourself" >&2; libs=""; }
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
ran=0
skipped=0
for gz in "$dir"/*.gz; do
  name=$(basename "$gz" .gz)
  gzip -dc "$gz" > "$work/$name" && chmod +x "$work/$name"
  echo "== missing libraries of $name: $(ldd "$work/$name" | grep 'not found' | tr -s ' \t' ' ' || true)"
  echo "== running $name"
  "$work/$name" --test-threads=1 --nocapture 2>&1 | tee "$work/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name exit status $rc"
  [ "$rc" -eq 0 ] || status=1
  ran=$((ran + 1))
  grep -q 'SKIPPED:' "$work/$name.log" && skipped=$((skipped + 1))
done
[ "$ran" -gt 0 ] || { echo "no test binaries in $dir" >&2; exit 2; }
if [ "$skipped" -gt 0 ]; then
  echo "== SKIPPED tests in $skipped of $ran binaries: no GPU result (see the lines above)"
  [ "$status" -ne 0 ] || status=3
fi
echo "== device check: $([ "$status" -eq 0 ] && echo PASSED || echo "NOT PASSED (status $status)")"
exit "$status"
