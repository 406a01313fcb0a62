#!/usr/bin/env python3
"""Reference outputs for the tagger with LAC features (models/tests/tagger.rs, train/src/lac.rs).

    pip install numpy safetensors
    python3 scripts/make_tagger_lac_fixture.py models/tests/fixtures

Builds `tagger-lac-tiny` from `tagger-bigram-tiny` (make_tagger_bigram_fixture.py): the same
character and bigram tables, emission layer (`fc`) and CRF, plus a tiny random LAC network (the
layout of Baidu LAC's small model, see models/src/tagger/lac.rs: a character embedding of 5 and
two bidirectional GRU layers of 4, `layers` [1, 2], so 16 features a character) and a new random
BiLSTM over 18 + 16 features a character. LAC's vocabulary holds some of the texts' characters;
the rest are its `OOV`.

The GRU is PaddlePaddle's `dynamic_gru` (origin_mode False), written here from Paddle's
documentation: per step, with x the input projection `fc_k` plus the GRU bias,
u, r = sigmoid(x_ur + h W_ur); c = tanh(x_c + (r * h) W_c); h = (1 - u) * h + u * c. `gru_k.w_0`
is stored as Paddle lays it out in memory: W_ur [H, 2H] row-major, then W_c [H, H]. The reverse
GRU runs over each sequence from its own last character. The reference runs in float64.

Writes tagger-lac-tiny/{config.json, tags.json, vocab.json, bigrams.json, lac_vocab.json,
model.safetensors, reference.safetensors, reference.json} and tagger-lac-tiny/lac/ (the same
network as a LAC folder: word.dic and model_baseline/ of PaddlePaddle LoDTensors, for the
reader in train/src/lac.rs). reference.safetensors: `ids` [B, L, 4] (character, left and right
bigram, LAC id; random ids at padded positions, so a leak of padding shows), `lengths`,
`lac_features` [B, L, 16] (zero past each length), `emissions` [B, L, T], `paths` [B, L] (-1 past
each length). reference.json: the texts and each one's ids.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tagger_intent_fixture import bilstm, viterbi  # noqa: E402

LAC_CHARS = ["我", "爱", "北", "京", "天", "安", "门", "上", "海", "中", "国", "A", "1"]
DIM, HIDDEN, LAYERS = 5, 4, 2


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def gru(x, proj_w, proj_b, w, b, n):
    """One direction over x [L, in], the first n rows, left to right: [L, H] (zero past n)."""
    h_dim = w.shape[0]
    flat = w.reshape(-1)
    w_ur = flat[:2 * h_dim * h_dim].reshape(h_dim, 2 * h_dim)
    w_c = flat[2 * h_dim * h_dim:].reshape(h_dim, h_dim)
    xp = x @ proj_w + proj_b + b.reshape(-1)
    h = np.zeros(h_dim)
    out = np.zeros((x.shape[0], h_dim))
    for t in range(n):
        ur = sigmoid(xp[t, :2 * h_dim] + h @ w_ur)
        u, r = ur[:h_dim], ur[h_dim:]
        c = np.tanh(xp[t, 2 * h_dim:] + (r * h) @ w_c)
        h = (1 - u) * h + u * c
        out[t] = h
    return out


def lac_layers(w, ids, n):
    """The outputs of each BiGRU layer for one sequence's LAC ids [L]: a list of [L, 2H]."""
    x = w["word_emb"][ids]
    outs = []
    for i in range(LAYERS):
        f, r = 2 * i, 2 * i + 1
        fwd = gru(x, w[f"fc_{f}.w_0"], w[f"fc_{f}.b_0"], w[f"gru_{f}.w_0"], w[f"gru_{f}.b_0"], n)
        rev = np.zeros_like(fwd)
        rev[:n] = gru(x[:n][::-1], w[f"fc_{r}.w_0"], w[f"fc_{r}.b_0"], w[f"gru_{r}.w_0"], w[f"gru_{r}.b_0"], n)[::-1]
        x = np.concatenate([fwd, rev], axis=1)
        outs.append(x)
    return outs


def lod_tensor(a):
    """PaddlePaddle's LoDTensor serialisation of an f32 array (no LoD)."""
    desc = bytearray([0x08, 0x05])
    for d in a.shape:
        desc.append(0x10)
        while True:
            byte, d = d & 0x7F, d >> 7
            desc.append(byte | (0x80 if d else 0))
            if not d:
                break
    head = struct.pack("<IQIi", 0, 0, 0, len(desc))
    return head + bytes(desc) + a.astype("<f4").tobytes()


def main(out_dir):
    src = os.path.join(out_dir, "tagger-bigram-tiny")
    dst = os.path.join(out_dir, "tagger-lac-tiny")
    w32 = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    ref = json.load(open(os.path.join(src, "reference.json")))
    texts = ref["texts"]
    lac_vocab = {c: i for i, c in enumerate(LAC_CHARS)}
    lac_vocab["OOV"] = len(LAC_CHARS)
    rows_lac = len(lac_vocab)

    rng = np.random.default_rng(14)
    lac = {"word_emb": rng.uniform(-1, 1, (rows_lac, DIM))}
    for k in range(2 * LAYERS):
        in_dim = DIM if k < 2 else 2 * HIDDEN
        lac[f"fc_{k}.w_0"] = rng.uniform(-0.8, 0.8, (in_dim, 3 * HIDDEN))
        lac[f"fc_{k}.b_0"] = rng.uniform(-0.3, 0.3, 3 * HIDDEN)
        lac[f"gru_{k}.w_0"] = rng.uniform(-0.8, 0.8, (HIDDEN, 3 * HIDDEN))
        lac[f"gru_{k}.b_0"] = rng.uniform(-0.3, 0.3, (1, 3 * HIDDEN))
    lac32 = {k: v.astype(np.float32) for k, v in lac.items()}

    rows = [[base + [lac_vocab.get(c, lac_vocab["OOV"])] for base, c in zip(r, t)] for t, r in zip(texts, ref["ids"])]
    b, l = len(texts), max(len(r) for r in rows)
    ids = np.stack([rng.integers(0, cfg["vocab_size"], (b, l)), rng.integers(0, cfg["bigram_vocab_size"], (b, l)),
                    rng.integers(0, cfg["bigram_vocab_size"], (b, l)), rng.integers(0, rows_lac, (b, l))],
                   axis=2).astype(np.int64)
    for s, r in enumerate(rows):
        ids[s, :len(r)] = r
    lengths = np.array([len(r) for r in rows], dtype=np.int64)

    hidden = cfg["hidden_size"]
    d_in = cfg["input_dim"] + 2 * cfg["bigram_dim"] + 2 * HIDDEN * LAYERS
    bound = 3.0 / np.sqrt(hidden)
    new = {}
    for suffix in ["", "_reverse"]:
        new[f"lstm.weight_ih_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, d_in)).astype(np.float32)
        new[f"lstm.weight_hh_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, hidden)).astype(np.float32)
        new[f"lstm.bias_ih_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
        new[f"lstm.bias_hh_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
    w = {k: v.astype(np.float64) for k, v in {**w32, **new}.items()}
    lac64 = {k: v.astype(np.float64) for k, v in lac32.items()}

    feats = np.zeros((b, l, 2 * HIDDEN * LAYERS))
    for s in range(b):
        n = int(lengths[s])
        feats[s] = np.concatenate(lac_layers(lac64, ids[s, :, 3], n), axis=1)
        feats[s, n:] = 0
    x = np.concatenate([w["embedding.weight"][ids[:, :, 0]], w["bigram_embedding.weight"][ids[:, :, 1]],
                        w["bigram_embedding.weight"][ids[:, :, 2]], feats], axis=2)
    h = bilstm(w, x, lengths, cfg["num_layers"])
    emissions = h @ w["fc.weight"].T + w["fc.bias"]
    start, end, trans = w["crf.start_transitions"], w["crf.end_transitions"], w["crf.transitions"]
    paths = np.full((b, l), -1, dtype=np.int64)
    for s in range(b):
        n = int(lengths[s])
        paths[s, :n] = viterbi(emissions[s], n, start, end, trans)

    os.makedirs(os.path.join(dst, "lac", "model_baseline"), exist_ok=True)
    cfg["lac"] = {"vocab_size": rows_lac, "dim": DIM, "hidden": HIDDEN, "num_layers": LAYERS, "layers": [1, 2]}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for name in ["tags.json", "vocab.json", "bigrams.json"]:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    json.dump(lac_vocab, open(os.path.join(dst, "lac_vocab.json"), "w"), ensure_ascii=False, indent=2, sort_keys=True)
    save_file({**w32, **new, **{f"lac.{k}": v for k, v in lac32.items()}}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "lac", "word.dic"), "w", encoding="utf-8") as f:
        for c, i in sorted(lac_vocab.items(), key=lambda kv: kv[1]):
            f.write(f"{i}\t{c}\n")
    for k, v in lac32.items():
        with open(os.path.join(dst, "lac", "model_baseline", k), "wb") as f:
            f.write(lod_tensor(v))
    save_file({"ids": ids, "lengths": lengths, "lac_features": feats.astype(np.float32),
               "emissions": emissions.astype(np.float32), "paths": paths},
              os.path.join(dst, "reference.safetensors"))
    json.dump({"texts": texts, "ids": rows}, open(os.path.join(dst, "reference.json"), "w"), ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
