#!/usr/bin/env python3
"""Side by side: concierge's text encoder vs sentence-transformers (PyTorch, CPU) on the same
real customer queries, same batch size, same machine, one after the other.

    python3 benches/compare_st.py --texts ../shared/data/banking77/train.csv --n 1000 --batch 32

sentence-transformers runs `model.encode(texts, batch_size=B)` (its own length sorting
included: that is how callers use it); concierge runs its in-process encoder bench
(`cargo bench --bench encoder -- --texts ...`), tokenisation included, batches in arrival
order. Each side is repeated and its best run reported. Needs: pip install sentence-transformers.
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import time


def read_texts(path, n):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [r[0] for r in rows[1:] if r and r[0]][:n]


def run_st(model_dir, texts, batch, repeat):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:64], batch_size=batch)  # warm-up
    best = 0.0
    for rep in range(repeat):
        t0 = time.perf_counter()
        out = model.encode(texts, batch_size=batch, normalize_embeddings=True)
        dt = time.perf_counter() - t0
        assert len(out) == len(texts)
        sps = len(texts) / dt
        best = max(best, sps)
        print(f"sentence-transformers run {rep}: {sps:.1f} sentences/s (torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)")
    return best


def run_concierge(root, texts_path, n, batch, repeat):
    cmd = ["cargo", "bench", "--quiet", "-p", "concierge-benches", "--bench", "encoder", "--",
           "--texts", os.path.abspath(texts_path), "--n", str(n), "--batch", str(batch), "--repeat", str(repeat)]
    out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True).stdout
    print(out.strip())
    m = re.search(r"RESULT concierge sentences_per_s ([0-9.]+)", out)
    return float(m.group(1))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", required=True, help="CSV with the text in the first column (Banking77 train.csv)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model-dir", default=os.path.join(root, "model-store", "all-MiniLM-L6-v2"))
    a = ap.parse_args()
    texts = read_texts(a.texts, a.n)
    print(f"{len(texts)} texts from {a.texts}, batch {a.batch}, {os.cpu_count()} cpus")
    st = run_st(a.model_dir, texts, a.batch, a.repeat)
    ours = run_concierge(root, a.texts, a.n, a.batch, a.repeat)
    print(f"\nsentence-transformers: {st:.1f} sentences/s")
    print(f"concierge:             {ours:.1f} sentences/s  ({ours / st:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
