#!/usr/bin/env bash
# The GPU benchmark, run on a CUDA machine from the repository root (issue: "GPU benchmarks in one
# script that a user runs on a CUDA box"). It needs:
#   - our CUDA binaries in $BIN (default cuda-bin/): concierge, encoder-bench, grpc-load, made by
#     `scripts/build-cuda.sh --with-benches` (plain or .zst-compressed; they are unpacked here);
#   - python3 with torch + transformers (a PyTorch environment); no network;
#   - the tokenizer of model-store/all-MiniLM-L6-v2 (scripts/fetch-default-model.sh; only
#     tokenizer.json, 1_Pooling/ and modules.json are read, the weights are not needed).
# What it does, all on GPU 0:
#   1. makes two random BERT checkpoints (MiniLM-L6 and BERT-base shapes; seeded, never zeros)
#      that both sides load;
#   2. measures the card's bf16/fp16 matrix-product rate (the MFU denominator);
#   3. our encoder (f16 and bf16) and transformers fp16 + SDPA over batch x length;
#   4. f16/bf16 parity: cosine against the f32 CPU embedding, on model-store/all-MiniLM-L6-v2
#      when its weights are there, else on the random MiniLM-shaped checkpoint (it says which);
#   5. gRPC end to end: the server on the GPU (MiniLM shape, f16), EmbedText at several
#      concurrencies, one text a call;
#   6. prints a markdown report (also in $OUT/report.md) for benches/RESULTS.md.
# Knobs: BATCHES=1,8,32,64,128,256 LENGTHS=16,64,128,256,512 SECONDS_PER=1 CONCURRENCY="1 8 64 256"
# OUT=benches/out/gpu PYTHON=python3. A quick run: BATCHES=1,32,256 LENGTHS=16,128,512.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-cuda-bin}
OUT=${OUT_DIR:-benches/out/gpu}
PY=${PYTHON:-python3}
BATCHES=${BATCHES:-1,8,32,64,128,256}
LENGTHS=${LENGTHS:-16,64,128,256,512}
SECONDS_PER=${SECONDS_PER:-1}
CONCURRENCY=${CONCURRENCY:-1 8 64 256}
TOKENIZER_DIR=${TOKENIZER_DIR:-model-store/all-MiniLM-L6-v2}
mkdir -p "$OUT"
for f in "$BIN"/*.zst; do
  [ -e "$f" ] || continue
  zstd -dqf "$f" -o "${f%.zst}" && chmod +x "${f%.zst}"
done
for b in concierge encoder-bench grpc-load; do
  [ -x "$BIN/$b" ] || { echo "gpu-bench: $BIN/$b is missing: build it with scripts/build-cuda.sh --with-benches" >&2; exit 2; }
done
# The CUDA libraries of pip's nvidia-* wheels (PyTorch's environment); an RPATH is not enough
# (NVRTC opens its builtins library by name).
NV_LIBS=$($PY - <<'PY'
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = []
for p in nvidia.__path__:
    for d in sorted(os.listdir(p)):
        lib = os.path.join(p, d, "lib")
        if os.path.isdir(lib):
            dirs.append(lib)
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv | tee "$OUT/card.txt"
date -u +"%Y-%m-%d %H:%M UTC" | tee -a "$OUT/card.txt"

$PY benches/gpu_vs_torch.py make-models --out "$OUT/models" --tokenizer-dir "$TOKENIZER_DIR"
$PY benches/gpu_vs_torch.py matmul --json "$OUT/matmul.json"

rm -f "$OUT/ours.jsonl" "$OUT/torch.jsonl" "$OUT/grpc.txt"
for m in minilm-l6-random bert-base-random; do
  for dt in f16 bf16; do
    "$BIN/encoder-bench" --model-dir "$OUT/models/$m" --device cuda:0 --dtype "$dt" \
      --batches "$BATCHES" --lengths "$LENGTHS" --seconds "$SECONDS_PER" --json "$OUT/ours.jsonl"
  done
done

PARITY_MODEL="$TOKENIZER_DIR"
[ -f "$PARITY_MODEL/model.safetensors" ] || PARITY_MODEL="$OUT/models/minilm-l6-random"
echo "parity on $PARITY_MODEL"
parity_failed=0
for dt in f16 bf16; do
  "$BIN/encoder-bench" --model-dir "$PARITY_MODEL" --device cuda:0 --dtype "$dt" --parity --json "$OUT/ours.jsonl" \
    | tail -1 || parity_failed=1
done

$PY benches/gpu_vs_torch.py torch --models "$OUT/models/minilm-l6-random" "$OUT/models/bert-base-random" \
  --batches "$BATCHES" --lengths "$LENGTHS" --seconds "$SECONDS_PER" --json "$OUT/torch.jsonl"

# gRPC end to end.
"$BIN/concierge" --device cuda:0 --dtype f16 --model-dir "$OUT/models/minilm-l6-random" \
  --no-image-model --no-entity-model --no-intent-model --kb-dir "$OUT/kb" \
  --listen 127.0.0.1:50151 --metrics-listen 127.0.0.1:0 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  grep -q "models loaded; serving" "$OUT/server.log" && break
  kill -0 $SERVER 2>/dev/null || { echo "gpu-bench: the server exited:" >&2; tail -20 "$OUT/server.log" >&2; exit 1; }
  sleep 1
done
for c in $CONCURRENCY; do
  n=$(( c * 100 > 2000 ? c * 100 : 2000 ))
  "$BIN/grpc-load" --addr 127.0.0.1:50151 --concurrency "$c" --requests "$n" --max-seconds 30 | tail -1 \
    | sed "s/^/concurrency $c: /" | tee -a "$OUT/grpc.txt"
done
kill $SERVER

$PY benches/gpu_vs_torch.py report --ours "$OUT/ours.jsonl" --torch "$OUT/torch.jsonl" --matmul "$OUT/matmul.json" \
  | tee "$OUT/report.md"
echo; echo "gRPC EmbedText, one MiniLM-shaped text a call, f16:"; cat "$OUT/grpc.txt"
exit $parity_failed
