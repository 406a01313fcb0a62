#!/usr/bin/env python3
"""Knowledge-base exact search next to FAISS IndexFlatIP, on the same vectors and queries.

For each size N (default 10k, 100k, 1M) at d=384: generates SYNTHETIC data (seeded Gaussian
vectors scaled to unit length: not real embeddings; real ones are clustered, which changes
nothing for an exact scan's speed but makes near-ties rarer), writes it as raw little-endian
f32 under benches/out/kb/, runs `cargo bench --bench kb_search` on it (RAYON_NUM_THREADS=T),
then FAISS IndexFlatIP (omp threads = T) with the same batch sizes, and prints one table with
recall@10 of our ids against FAISS's.

FAISS's flat search picks its code by batch size. In faiss-cpu 1.15 (distances.cpp): with
fewer queries than threads and >= 10k rows (here: batch 1 on 2 threads) it splits the rows over
the threads and calls BLAS sgemm per 1024-row block; otherwise, while nq * d is below
`distance_compute_blas_threshold` (128000, so nq < 334 at d=384: every batch here) it runs its
own SIMD loop parallel over queries, each query scanning all rows on its own; above it, BLAS
sgemm in blocks. (Older FAISS switched to BLAS at nq >= 20.) So each batch > 1 also runs a
second time with the threshold at 0 ("FAISS BLAS"), which is FAISS's batched GEMM path.

    pip install faiss-cpu numpy
    python3 benches/kb_vs_faiss.py [--sizes 10k,100k,1M] [--threads 2] [--batch 1,8,32]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benches" / "out" / "kb"


def parse_size(s):
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def unit_gaussian(n, d, seed, chunk=100_000):
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - lo), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[lo:lo + len(x)] = x
    return out


def materialise(path, n, d, seed):
    """The array, from `path` when it is already there with the right size."""
    if path.exists() and path.stat().st_size == n * d * 4:
        return np.fromfile(path, dtype="<f4").reshape(n, d)
    x = unit_gaussian(n, d, seed)
    x.astype("<f4").tofile(path)
    return x


def cpu_busy(secs=1.0):
    """Fraction of all CPUs busy over `secs`, from /proc/stat (Linux; None elsewhere)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = snap()
        time.sleep(secs)
        t1, i1 = snap()
        return 1.0 - (i1 - i0) / max(1, t1 - t0)
    except OSError:
        return None


def wait_quiet(max_wait, threshold=0.10):
    """Waits (up to max_wait s) until other work leaves the CPUs idle: on a small shared machine
    a compile beside the run halves either side's numbers. Returns the busy fraction seen."""
    deadline = time.time() + max_wait
    while True:
        busy = cpu_busy()
        if busy is None or busy < threshold or time.time() >= deadline:
            if busy is not None:
                print("    cpu busy before run: %.0f%%%s" % (100 * busy, "" if busy < threshold else " (gave up waiting)"), flush=True)
            return busy


class Others:
    """CPU time that other processes took during a run, as a share of all CPUs: /proc/stat's
    busy time less this process's and its children's. Printed next to each run's numbers."""

    def __enter__(self):
        self.t0 = self._now()
        return self

    @staticmethod
    def _now():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return (sum(v) - v[3] - v[4]) / hz, sum(v) / hz, t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        t1 = self._now()
        if self.t0 is not None and t1 is not None:
            busy, total, own = (b - a for a, b in zip(self.t0, t1))
            self.share = max(0.0, busy - own) / max(1e-9, total)
            print("    other processes used %.0f%% of the CPUs during this run" % (100 * self.share), flush=True)
        return False


def percentile(sorted_s, p):
    """Nearest rank, as benches/src/lib.rs does."""
    if not sorted_s:
        return 0.0
    rank = int(np.ceil(p / 100.0 * len(sorted_s)))
    return sorted_s[min(max(rank, 1), len(sorted_s)) - 1]


def run_ours(base, queries, d, batches, k, threads, b1_queries, ids_out, quiet_wait, ours_bin=None):
    launcher = [ours_bin] if ours_bin else ["cargo", "bench", "-q", "-p", "concierge-benches", "--bench", "kb_search", "--"]
    cmd = launcher + ["--vectors", str(base), "--queries", str(queries), "--dim", str(d),
           "--batch", ",".join(map(str, batches)), "--k", str(k), "--ids-out", str(ids_out)]
    if b1_queries is not None:
        cmd += ["--batch1-queries", str(b1_queries)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    wait_quiet(quiet_wait)
    print("$ RAYON_NUM_THREADS=%d %s" % (threads, " ".join(cmd)), flush=True)
    with Others():
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write("".join("    " + l + "\n" for l in proc.stdout.splitlines() if not l.startswith("RESULT")))
    if proc.returncode != 0:
        raise SystemExit("kb_search failed (exit %d)" % proc.returncode)
    res = {}
    for m in re.finditer(r"RESULT batch=(\d+) queries=(\d+) qps=([\d.]+) p50_ms=([\d.]+) p99_ms=([\d.]+)", proc.stdout):
        b, nq, qps, p50, p99 = m.groups()
        res[int(b)] = dict(queries=int(nq), qps=float(qps), p50=float(p50), p99=float(p99))
    load = re.search(r"load: \d+ rows in ([\d.]+) s", proc.stdout)
    ids = [[int(x) for x in line.split()] for line in ids_out.read_text().splitlines()]
    return res, (float(load.group(1)) if load else None), ids


def run_faiss(xb, xq, batches, k, b1_queries, quiet_wait):
    """FAISS with its default thresholds, then (batches > 1) with BLAS forced. Returns
    (default results, BLAS results, default ids)."""
    import faiss
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    wait_quiet(quiet_wait)
    res, ids = {}, None
    with Others():
        ids = faiss_batches(index, xq, batches, k, b1_queries, res, "faiss")
    blas = {}
    forced = [b for b in batches if b > 1]
    if forced:
        faiss.cvar.distance_compute_blas_threshold = 0
        wait_quiet(quiet_wait)
        with Others():
            faiss_batches(index, xq, forced, k, b1_queries, blas, "faiss BLAS")
        faiss.cvar.distance_compute_blas_threshold = default_threshold
    return res, blas, ids


def faiss_batches(index, xq, batches, k, b1_queries, res, label):
    ids = None
    for b in batches:
        nq = min(b1_queries, len(xq)) if (b == 1 and b1_queries is not None) else len(xq)
        q = np.ascontiguousarray(xq[:nq])
        index.search(q[:b], k)  # warm-up, untimed, as ours
        lat, got = [], []
        t0 = time.perf_counter()
        for lo in range(0, nq, b):
            t = time.perf_counter()
            _, I = index.search(q[lo:lo + b], k)
            lat.append(time.perf_counter() - t)
            got.append(I)
        secs = time.perf_counter() - t0
        lat.sort()
        res[b] = dict(queries=nq, qps=nq / secs, p50=percentile(lat, 50) * 1e3, p99=percentile(lat, 99) * 1e3)
        if b == max(batches):
            ids = np.concatenate(got)
        print("    %s batch %3d: %6d queries  %9.1f QPS  p50 %.2f ms  p99 %.2f ms"
              % (label, b, nq, res[b]["qps"], res[b]["p50"], res[b]["p99"]), flush=True)
    return ids


def recall(ours, theirs, xb, xq, k, tie_eps=1e-5):
    """recall@k of our ids against FAISS's, and how many misses are near-ties: the id we
    returned instead scores within tie_eps of FAISS's k-th (exact scores in float64)."""
    hit = miss = ties = 0
    for i, (a, f) in enumerate(zip(ours, theirs)):
        a, f = set(a[:k]), set(int(x) for x in f[:k] if x >= 0)
        hit += len(a & f)
        extra = a - f
        miss += len(f - a)
        if extra:
            q = xq[i].astype(np.float64)
            kth = min(float(xb[j].astype(np.float64) @ q) for j in f)
            ties += sum(1 for j in extra if abs(float(xb[j].astype(np.float64) @ q) - kth) < tie_eps)
    return hit / max(1, hit + miss), miss, ties


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10k,100k,1M")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="RAYON_NUM_THREADS and faiss.omp_set_num_threads")
    ap.add_argument("--b1-queries-1m", type=int, default=1000,
                    help="queries at batch 1 for sizes >= 1M (each is a full 1.5 GB scan)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--ours-bin", help="a built kb_search binary to run instead of `cargo bench` (A/B of two builds)")
    ap.add_argument("--quiet-wait", type=float, default=600,
                    help="wait up to this many seconds for an idle CPU before each timed run")
    args = ap.parse_args()

    import faiss
    faiss.omp_set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    d, k = args.dim, args.k
    print("faiss %s, distance_compute_blas_threshold %d (compared with nq*d), %d threads; numpy %s"
          % (faiss.__version__, faiss.cvar.distance_compute_blas_threshold, args.threads, np.__version__))

    qpath = OUT / ("queries_%d_d%d_s%d.f32" % (args.queries, d, args.seed + 1))
    xq = materialise(qpath, args.queries, d, args.seed + 1)
    rows = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        print("\n== N=%d d=%d" % (size, d), flush=True)
        t = time.perf_counter()
        bpath = OUT / ("base_%d_d%d_s%d.f32" % (size, d, args.seed))
        xb = materialise(bpath, size, d, args.seed)
        print("    data: %s (%.1f s)" % (bpath, time.perf_counter() - t))
        b1 = args.b1_queries_1m if size >= 1_000_000 else None
        ours, load, ours_ids = run_ours(bpath, qpath, d, batches, k, args.threads, b1, OUT / ("ids_ours_%d.txt" % size),
                                         args.quiet_wait, args.ours_bin)
        theirs, blas, faiss_ids = run_faiss(xb, xq, batches, k, b1, args.quiet_wait)
        rec, miss, ties = recall(ours_ids, faiss_ids, xb, xq, k)
        for b in batches:
            o, f, fb = ours[b], theirs[b], blas.get(b)
            best = max(f["qps"], fb["qps"] if fb else 0.0)
            rows.append(dict(size=size, batch=b, queries=o["queries"], ours=o, faiss=f, faiss_blas=fb, ratio=o["qps"] / best,
                             recall=rec, misses=miss, near_ties=ties, load_s=load))
        del xb

    print("\nrecall@%d: our ids vs FAISS's over all %d queries (largest batch); 'ties' = misses whose"
          " replacement scores within 1e-5 of FAISS's %d-th" % (k, args.queries, k))
    print("FAISS = default thresholds; FAISS BLAS = distance_compute_blas_threshold 0 (batch 1 takes the"
          " same row-parallel sgemm path either way); ours/FAISS is against the faster of the two")
    print("| N | batch | queries | ours QPS | ours p50 ms | ours p99 ms | FAISS QPS | FAISS p50 ms | FAISS p99 ms"
          " | FAISS BLAS QPS | FAISS BLAS p50 ms | FAISS BLAS p99 ms | ours/FAISS | recall@%d (misses, ties) |" % k)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, f, fb = r["ours"], r["faiss"], r["faiss_blas"]
        blas_cells = "%.1f | %.2f | %.2f" % (fb["qps"], fb["p50"], fb["p99"]) if fb else "– | – | –"
        print("| %s | %d | %d | %.1f | %.2f | %.2f | %.1f | %.2f | %.2f | %s | %.2f× | %.4f (%d, %d) |"
              % (f"{r['size']:,}", r["batch"], r["queries"], o["qps"], o["p50"], o["p99"],
                 f["qps"], f["p50"], f["p99"], blas_cells, r["ratio"], r["recall"], r["misses"], r["near_ties"]))
    for size in sorted({r["size"] for r in rows}):
        load = next(r["load_s"] for r in rows if r["size"] == size)
        if load is not None:
            print("load into the store (durable upserts of 10k): N=%s %.2f s" % (f"{size:,}", load))
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
