#!/usr/bin/env python3
"""The PyTorch side of the GPU benchmark (scripts/gpu-bench.sh runs it; see that script).

Subcommands, all on a CUDA machine with torch + transformers (PyTorch's environment):
  make-models --out DIR --tokenizer-dir model-store/all-MiniLM-L6-v2
      Two randomly initialised BERT checkpoints (transformers' own init, seeded; never zeros),
      shaped as all-MiniLM-L6-v2 (6 x 384) and BERT-base (12 x 768), saved as safetensors with the
      tokenizer and mean pooling of the tokenizer dir, so our encoder and PyTorch load the very
      same weights. Random weights time the same as trained ones.
  matmul --json FILE
      The card's measured bf16 and fp16 matrix-product rate (8192^3, median of timed runs): the
      denominator of model FLOPs utilisation.
  torch --models DIR... --batches ... --lengths ... --json FILE
      transformers' BertModel in fp16 with SDPA attention, mean pooling and L2 normalisation,
      vectors copied to the host each call (what our encoder bench times too), over the same
      grid of batch x length on random token ids.
  report --ours FILE --torch FILE --matmul FILE
      A markdown table per model: ours vs PyTorch, sequences/s, tokens/s, p50, and our MFU.

Timing: each call is synchronised (the host copy of the vectors), warmed up first, repeated for
--seconds (at least 5 calls); p50/p90/p99 of per-call wall time; throughput = calls x batch /
elapsed. Same rules as benches/benches/encoder.rs.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import time


def make_models(args):
    import torch
    from transformers import BertConfig, BertModel

    shapes = {
        "minilm-l6-random": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
        "bert-base-random": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    }
    for name, shape in shapes.items():
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        torch.manual_seed(13)
        cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
        model = BertModel(cfg, add_pooling_layer=False)
        model.save_pretrained(out, safe_serialization=True)
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json"]:
            src = os.path.join(args.tokenizer_dir, f)
            if os.path.exists(src):
                shutil.copy(src, out)
        pooling = os.path.join(args.tokenizer_dir, "1_Pooling")
        if os.path.isdir(pooling):
            dst = os.path.join(out, "1_Pooling")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(pooling, dst)
            with open(os.path.join(dst, "config.json")) as f:
                p = json.load(f)
            p["word_embedding_dimension"] = shape["hidden_size"]
            with open(os.path.join(dst, "config.json"), "w") as f:
                json.dump(p, f)
        n = sum(p.numel() for p in model.parameters())
        print(f"{out}: {n / 1e6:.1f}M parameters")


def cuda_time(fn, seconds, min_calls=5):
    import torch

    fn()
    torch.cuda.synchronize()
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(lat) < min_calls:
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    return lat, time.perf_counter() - start


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def matmul(args):
    import torch

    out = {"device": torch.cuda.get_device_name(0), "driver": torch.version.cuda}
    n = 8192
    for dtype in [torch.bfloat16, torch.float16]:
        # Several input sets so no run reads another's cached operands; random, never zeros.
        sets = [(torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)) for _ in range(3)]
        for a, b in sets:
            a @ b
        torch.cuda.synchronize()
        times = []
        for i in range(30):
            a, b = sets[i % len(sets)]
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        tflops = 2 * n**3 / statistics.median(times) / 1e12
        out[str(dtype).replace("torch.", "") + "_tflops"] = tflops
        print(f"{dtype}: {tflops:.1f} TFLOP/s (median of 30, {n}^3)")
    with open(args.json, "w") as f:
        json.dump(out, f)


def torch_grid(args):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for model_dir in args.models:
        model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float16, attn_implementation="sdpa").cuda().eval()
        name = os.path.basename(os.path.normpath(model_dir))
        g = torch.Generator(device="cpu").manual_seed(7)
        print(f"{name}: fp16, sdpa")
        for length in args.lengths:
            if length > model.config.max_position_embeddings:
                continue
            for batch in args.batches:
                ids = torch.randint(1000, 30000, (batch, length), generator=g)
                ids[:, 0], ids[:, -1] = 101, 102
                ids = ids.cuda()
                mask = torch.ones_like(ids)

                @torch.inference_mode()
                def call():
                    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    m = mask.unsqueeze(-1).to(h.dtype)
                    v = (h * m).sum(1) / m.sum(1)
                    return F.normalize(v.float(), dim=-1).cpu()

                try:
                    lat, total = cuda_time(call, args.seconds)
                except torch.cuda.OutOfMemoryError:
                    print(f"  batch {batch} len {length}: out of memory")
                    torch.cuda.empty_cache()
                    continue
                sps = len(lat) * batch / total
                row = {"impl": "torch-fp16-sdpa", "model": name, "device": "cuda:0", "dtype": "f16", "batch": batch,
                       "len": length, "sentences_per_s": sps, "tokens_per_s": sps * length,
                       "p50_ms": pct(lat, 50) * 1e3, "p90_ms": pct(lat, 90) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "calls": len(lat)}
                rows.append(row)
                print(f"  batch {batch:>4} len {length:>4}: {sps:10.1f} seq/s  p50 {row['p50_ms']:.2f} ms")
        del model
        torch.cuda.empty_cache()
    with open(args.json, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def flops_per_sequence(hidden, layers, inter, length):
    # Dense layers: q, k, v, o (4 H^2) and the feed-forward (2 H I), two FLOPs a multiply-add;
    # attention scores and context: 2 x 2 L^2 H. Embedding lookups, norms and softmax left out.
    return layers * (2 * length * (4 * hidden * hidden + 2 * hidden * inter) + 4 * length * length * hidden)


def report(args):
    def load(path):
        out = []
        if path and os.path.exists(path):
            with open(path) as f:
                out = [json.loads(line) for line in f if line.strip()]
        return out

    ours, theirs = load(args.ours), load(args.torch)
    mm = json.load(open(args.matmul)) if args.matmul and os.path.exists(args.matmul) else {}
    shapes = {"minilm-l6-random": (384, 6, 1536), "bert-base-random": (768, 12, 3072)}
    key = lambda r: (r["model"], r["batch"], r["len"])
    torch_by = {key(r): r for r in theirs}
    print(f"Card: {mm.get('device', '?')}; measured matrix-product rate bf16 {mm.get('bfloat16_tflops', float('nan')):.1f}, "
          f"fp16 {mm.get('float16_tflops', float('nan')):.1f} TFLOP/s\n")
    for dtype in sorted({r["dtype"] for r in ours if not r.get("parity")}):
        for model in sorted({r["model"] for r in ours if r["dtype"] == dtype and not r.get("parity")}):
            rate = mm.get("bfloat16_tflops" if dtype == "bf16" else "float16_tflops")
            print(f"### {model}, ours {dtype} vs PyTorch fp16 + SDPA\n")
            print("| batch | len | ours seq/s | PyTorch seq/s | ours / PyTorch | ours tokens/s | ours p50 ms | PyTorch p50 ms | ours MFU |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in sorted((r for r in ours if r["model"] == model and r["dtype"] == dtype and not r.get("parity")), key=lambda r: (r["len"], r["batch"])):
                t = torch_by.get(key(r))
                mfu = ""
                if model in shapes and rate:
                    h, layers, inter = shapes[model]
                    mfu = f"{100 * r['sentences_per_s'] * flops_per_sequence(h, layers, inter, r['len']) / (rate * 1e12):.1f}%"
                ratio = f"{r['sentences_per_s'] / t['sentences_per_s']:.2f}" if t else "—"
                tp = f"{t['sentences_per_s']:.1f}" if t else "—"
                tp50 = f"{t['p50_ms']:.2f}" if t else "—"
                print(f"| {r['batch']} | {r['len']} | {r['sentences_per_s']:.1f} | {tp} | {ratio} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.2f} | {tp50} | {mfu} |")
            print()
    for r in ours:
        if r.get("parity"):
            print(f"Parity {r['model']} {r['device']} {r['dtype']} vs CPU f32: lowest cosine {r['lowest_cosine']:.6f} over {r['sentences']} sentences")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-models")
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer-dir", required=True)
    mm = sub.add_parser("matmul")
    mm.add_argument("--json", required=True)
    t = sub.add_parser("torch")
    t.add_argument("--models", nargs="+", required=True)
    t.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64, 128, 256])
    t.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 128, 256, 512])
    t.add_argument("--seconds", type=float, default=1.0)
    t.add_argument("--json", required=True)
    r = sub.add_parser("report")
    r.add_argument("--ours", required=True)
    r.add_argument("--torch")
    r.add_argument("--matmul")
    args = ap.parse_args()
    {"make-models": make_models, "matmul": matmul, "torch": torch_grid, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
