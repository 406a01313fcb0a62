#!/usr/bin/env python3
"""Reference outputs for the character-bigram tagger (models/tests/tagger.rs).

    pip install numpy safetensors
    python3 scripts/make_tagger_bigram_fixture.py models/tests/fixtures

Builds `tagger-bigram-tiny` from `tagger-chars-tiny` (made by make_tagger_fixture.py with
PyTorch): the same character vocabulary and embedding table, emission layer (`fc`) and CRF, plus
a bigram table over `bigrams.json` (`bigram_vocab_size`, `bigram_dim` in config.json). A
character's features are its embedding, then the embeddings of the bigram ending at it and of the
bigram starting at it (`<s>` before the first character, `</s>` after the last; a bigram not in
bigrams.json is `<unk>`, id 0), so the BiLSTM (new random weights, input 10 + 2 x 4) reads 18
features a character. Input ids are [B, L, 3]: character, left bigram, right bigram.

The reference runs in float64 with NumPy (the BiLSTM and Viterbi of
make_tagger_intent_fixture.py). They are first checked against tagger-chars-tiny's PyTorch
reference (its embeddings through its BiLSTM and emission layer: emissions within 1e-5, the same
paths), so the new outputs stand on PyTorch's.

Writes tagger-bigram-tiny/{config.json, tags.json, vocab.json, bigrams.json, model.safetensors,
reference.safetensors, reference.json}. reference.safetensors: `ids` [B, L, 3] (random ids at
padded positions, so a leak of padding shows), `lengths`, `emissions` [B, L, T], `paths` [B, L]
(-1 past each length). reference.json: the texts and each one's [character, left, right] ids.
"""
import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tagger_intent_fixture import bilstm, viterbi  # noqa: E402

BIGRAMS = ["<unk>", "<s>我", "我爱", "爱北", "北京", "京天", "天安", "安门", "门</s>", "<s>北", "京烤",
           "烤鸭", "鸭</s>", "中国", "国</s>", "<s>上", "上海", "人民", "大学", "学</s>", "<s>欢", "欢迎"]
BIGRAM_DIM = 4


def main(out_dir):
    src = os.path.join(out_dir, "tagger-chars-tiny")
    dst = os.path.join(out_dir, "tagger-bigram-tiny")
    w32 = load_file(os.path.join(src, "model.safetensors"))
    w = {k: v.astype(np.float64) for k, v in w32.items()}
    ref = load_file(os.path.join(src, "reference.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    vocab = json.load(open(os.path.join(src, "vocab.json")))
    texts = json.load(open(os.path.join(src, "reference.json")))["texts"]

    # The NumPy BiLSTM and Viterbi against PyTorch's on the character tagger.
    x = w["embedding.weight"][ref["ids"]]
    h = bilstm(w, x, ref["lengths"], cfg["num_layers"])
    base = h @ w["fc.weight"].T + w["fc.bias"]
    err = np.abs(base - ref["emissions"]).max()
    assert err < 1e-5, f"the NumPy BiLSTM is {err} from PyTorch's emissions"
    start, end, trans = w["crf.start_transitions"], w["crf.end_transitions"], w["crf.transitions"]
    for s in range(len(texts)):
        n = int(ref["lengths"][s])
        assert viterbi(ref["emissions"][s].astype(np.float64), n, start, end, trans) == list(ref["paths"][s, :n]), s
    print(f"NumPy BiLSTM within {err:.2e} of PyTorch on tagger-chars-tiny; Viterbi paths equal", file=sys.stderr)

    rng = np.random.default_rng(11)
    bigram_ids = {b: i for i, b in enumerate(BIGRAMS)}
    unk = vocab["<unk>"]
    rows = []
    for t in texts:
        chars = list(t)
        padded = ["<s>"] + chars + ["</s>"]
        pairs = [padded[k] + padded[k + 1] for k in range(len(padded) - 1)]
        rows.append([[vocab.get(c, unk), bigram_ids.get(pairs[i], 0), bigram_ids.get(pairs[i + 1], 0)]
                     for i, c in enumerate(chars)])
    b, l = len(texts), max(len(r) for r in rows)
    ids = np.stack([rng.integers(0, len(vocab), (b, l)), rng.integers(0, len(BIGRAMS), (b, l)),
                    rng.integers(0, len(BIGRAMS), (b, l))], axis=2).astype(np.int64)
    for s, r in enumerate(rows):
        ids[s, :len(r)] = r
    lengths = np.array([len(r) for r in rows], dtype=np.int64)

    hidden = cfg["hidden_size"]
    d_in = cfg["input_dim"] + 2 * BIGRAM_DIM
    bound = 3.0 / np.sqrt(hidden)
    new = {"bigram_embedding.weight": rng.standard_normal((len(BIGRAMS), BIGRAM_DIM)).astype(np.float32)}
    for suffix in ["", "_reverse"]:
        new[f"lstm.weight_ih_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, d_in)).astype(np.float32)
        new[f"lstm.weight_hh_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, hidden)).astype(np.float32)
        new[f"lstm.bias_ih_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
        new[f"lstm.bias_hh_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
    w.update({k: v.astype(np.float64) for k, v in new.items()})

    x = np.concatenate([w["embedding.weight"][ids[:, :, 0]], w["bigram_embedding.weight"][ids[:, :, 1]],
                        w["bigram_embedding.weight"][ids[:, :, 2]]], axis=2)
    h = bilstm(w, x, lengths, cfg["num_layers"])
    emissions = h @ w["fc.weight"].T + w["fc.bias"]
    paths = np.full((b, l), -1, dtype=np.int64)
    for s in range(b):
        n = int(lengths[s])
        paths[s, :n] = viterbi(emissions[s], n, start, end, trans)

    os.makedirs(dst, exist_ok=True)
    cfg["bigram_vocab_size"] = len(BIGRAMS)
    cfg["bigram_dim"] = BIGRAM_DIM
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for name in ["tags.json", "vocab.json"]:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    json.dump(bigram_ids, open(os.path.join(dst, "bigrams.json"), "w"), ensure_ascii=False, indent=2)
    save_file({**w32, **new}, os.path.join(dst, "model.safetensors"))
    save_file({"ids": ids, "lengths": lengths, "emissions": emissions.astype(np.float32), "paths": paths},
              os.path.join(dst, "reference.safetensors"))
    json.dump({"texts": texts, "ids": rows}, open(os.path.join(dst, "reference.json"), "w"), ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
