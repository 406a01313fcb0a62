#!/usr/bin/env python3
"""Reference outputs for the tagger with word-vector lexicon features (SoftLexicon;
models/tests/tagger.rs).

    pip install numpy safetensors
    python3 scripts/make_tagger_soft_lexicon_fixture.py models/tests/fixtures

Builds `tagger-soft-lexicon-tiny` from `tagger-bigram-tiny` (make_tagger_bigram_fixture.py, which
stands on make_tagger_fixture.py's PyTorch reference): the same character and bigram tables,
emission layer (`fc`) and CRF, plus a soft lexicon (`soft_lexicon` {words 13, dim 4, per_set 2}:
twelve words with weights, `soft_lexicon.txt`, and a random vector table `soft_lexicon.embedding`
whose row 0 is zeros) and a new random BiLSTM over 18 + 3 x 4 features a character.

The features, computed here independently of the Rust code (Ma et al. 2020): for each character,
the lexicon words (2 characters or more) that begin at it (B), pass through it (M) and end at it
(E); each set keeps its `per_set` heaviest words (ties: the lower id), 0 filling. With Z the sum
of the kept words' weights over the three sets, each set's vector is 3 / Z * sum(weight * vector)
(zeros when Z = 0). Input ids are [B, L, 3 + 6]: character, left bigram, right bigram, then B's,
M's and E's word ids. The reference runs in float64 with NumPy (the BiLSTM and Viterbi of
make_tagger_intent_fixture.py).

Writes tagger-soft-lexicon-tiny/{config.json, tags.json, vocab.json, bigrams.json,
soft_lexicon.txt, model.safetensors, reference.safetensors, reference.json}.
reference.safetensors: `ids` [B, L, 9] (random ids at padded positions, so a leak of padding
shows), `lengths`, `features` [B, L, 12] (the soft lexicon's), `emissions` [B, L, T], `paths`
[B, L] (-1 past each length). reference.json: the texts and each one's ids.
"""
import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tagger_intent_fixture import bilstm, viterbi  # noqa: E402

# id order (from 1) and weights; overlapping words (北京 / 北京烤鸭 / 京天, 人民 / 人民大学 / 大学)
# give sets of two, and 门 ends three (天安门 3, 安门 0.5, 北京天安门 0.5): per_set 2 keeps 天安门
# and, of the two that tie, 安门 (the lower id).
WORDS = [("北京", 5.0), ("北京烤鸭", 2.0), ("天安门", 3.0), ("人民", 4.0), ("大学", 6.0), ("人民大学", 1.0),
         ("上海", 2.5), ("欢迎", 1.5), ("京天", 0.5), ("天安", 0.5), ("安门", 0.5), ("北京天安门", 0.5)]
DIM = 4
PER_SET = 2


def sets_of(chars):
    """Per character, the [B, M, E] word ids, heaviest first, per_set each, 0 filling."""
    sets = [[[], [], []] for _ in chars]
    ids = {w: k + 1 for k, (w, _) in enumerate(WORDS)}
    for i in range(len(chars)):
        for j in range(i + 1, len(chars)):
            wid = ids.get("".join(chars[i:j + 1]))
            if wid is None:
                continue
            sets[i][0].append(wid)
            for k in range(i + 1, j):
                sets[k][1].append(wid)
            sets[j][2].append(wid)
    out = []
    for char_sets in sets:
        row = []
        for s in char_sets:
            s = sorted(s, key=lambda w: (-WORDS[w - 1][1], w))[:PER_SET]
            row += s + [0] * (PER_SET - len(s))
        out.append(row)
    return out


def features(ids, table, weights):
    """[B, L, 3 * DIM] from word ids [B, L, 3 * PER_SET]."""
    b, l, _ = ids.shape
    out = np.zeros((b, l, 3 * DIM))
    for s in range(b):
        for t in range(l):
            w = weights[ids[s, t]]
            z = w.sum()
            if z == 0:
                continue
            for k in range(3):
                ks = slice(k * PER_SET, (k + 1) * PER_SET)
                out[s, t, k * DIM:(k + 1) * DIM] = 3.0 / z * (w[ks, None] * table[ids[s, t, ks]]).sum(0)
    return out


def main(out_dir):
    src = os.path.join(out_dir, "tagger-bigram-tiny")
    dst = os.path.join(out_dir, "tagger-soft-lexicon-tiny")
    w32 = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    ref = json.load(open(os.path.join(src, "reference.json")))
    texts = ref["texts"]

    rng = np.random.default_rng(14)
    rows = [[base + soft for base, soft in zip(r, sets_of(list(t)))] for t, r in zip(texts, ref["ids"])]
    b, l = len(texts), max(len(r) for r in rows)
    n_words = len(WORDS) + 1
    ids = np.concatenate([np.stack([rng.integers(0, cfg["vocab_size"], (b, l)),
                                    rng.integers(0, cfg["bigram_vocab_size"], (b, l)),
                                    rng.integers(0, cfg["bigram_vocab_size"], (b, l))], axis=2),
                          rng.integers(0, n_words, (b, l, 3 * PER_SET))], axis=2).astype(np.int64)
    for s, r in enumerate(rows):
        ids[s, :len(r)] = r
    lengths = np.array([len(r) for r in rows], dtype=np.int64)

    hidden = cfg["hidden_size"]
    d_in = cfg["input_dim"] + 2 * cfg["bigram_dim"] + 3 * DIM
    bound = 3.0 / np.sqrt(hidden)
    table = rng.standard_normal((n_words, DIM)).astype(np.float32)
    table[0] = 0.0
    new = {"soft_lexicon.embedding": table}
    for suffix in ["", "_reverse"]:
        new[f"lstm.weight_ih_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, d_in)).astype(np.float32)
        new[f"lstm.weight_hh_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, hidden)).astype(np.float32)
        new[f"lstm.bias_ih_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
        new[f"lstm.bias_hh_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
    w = {k: v.astype(np.float64) for k, v in {**w32, **new}.items()}

    weights = np.array([0.0] + [c for _, c in WORDS])
    soft = features(ids[:, :, 3:], w["soft_lexicon.embedding"], weights)
    x = np.concatenate([w["embedding.weight"][ids[:, :, 0]], w["bigram_embedding.weight"][ids[:, :, 1]],
                        w["bigram_embedding.weight"][ids[:, :, 2]], soft], axis=2)
    h = bilstm(w, x, lengths, cfg["num_layers"])
    emissions = h @ w["fc.weight"].T + w["fc.bias"]
    start, end, trans = w["crf.start_transitions"], w["crf.end_transitions"], w["crf.transitions"]
    paths = np.full((b, l), -1, dtype=np.int64)
    for s in range(b):
        n = int(lengths[s])
        paths[s, :n] = viterbi(emissions[s], n, start, end, trans)

    os.makedirs(dst, exist_ok=True)
    cfg["soft_lexicon"] = {"words": n_words, "dim": DIM, "per_set": PER_SET}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for name in ["tags.json", "vocab.json", "bigrams.json"]:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "soft_lexicon.txt"), "w", encoding="utf-8") as f:
        for word, c in WORDS:
            f.write(f"{word}\t{c:g}\n")
    save_file({**w32, **new}, os.path.join(dst, "model.safetensors"))
    save_file({"ids": ids, "lengths": lengths, "features": soft.astype(np.float32),
               "emissions": emissions.astype(np.float32), "paths": paths},
              os.path.join(dst, "reference.safetensors"))
    json.dump({"texts": texts, "ids": rows}, open(os.path.join(dst, "reference.json"), "w"), ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
