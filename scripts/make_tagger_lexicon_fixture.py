#!/usr/bin/env python3
"""Reference outputs for the tagger with lexicon features (models/tests/tagger.rs).

    pip install numpy safetensors
    python3 scripts/make_tagger_lexicon_fixture.py models/tests/fixtures

Builds `tagger-lexicon-tiny` from `tagger-bigram-tiny` (make_tagger_bigram_fixture.py, which
stands on make_tagger_fixture.py's PyTorch reference): the same character and bigram tables,
emission layer (`fc`) and CRF, plus lexicon features (`lexicon_classes` ["word", "org"],
`lexicon_dim` 3, `lexicon.txt`) and a new random BiLSTM over 18 + 2 x 3 features a character.

Lexicon features, computed here independently of the Rust matcher: for each class and each
character, three bits, set when a word of that class (2 characters or more) begins at the
character (1), passes through it (2) or ends at it (4); the id is class * 8 + bits, a row of
`lexicon_embedding.weight` [2 * 8, 3]. Input ids are [B, L, 5]: character, left bigram, right
bigram, word class, org class. The reference runs in float64 with NumPy (the BiLSTM and Viterbi of
make_tagger_intent_fixture.py).

Writes tagger-lexicon-tiny/{config.json, tags.json, vocab.json, bigrams.json, lexicon.txt,
model.safetensors, reference.safetensors, reference.json}. reference.safetensors: `ids` [B, L, 5]
(random ids at padded positions, so a leak of padding shows), `lengths`, `emissions` [B, L, T],
`paths` [B, L] (-1 past each length). reference.json: the texts and each one's ids.
"""
import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tagger_intent_fixture import bilstm, viterbi  # noqa: E402

CLASSES = ["word", "org"]
# word -> classes; overlapping words (北京 / 北京烤鸭, 人民 / 人民大学 / 大学) exercise B|E and M|B.
LEXICON = {"北京": ["word"], "北京烤鸭": ["word"], "天安门": ["word", "org"], "人民": ["word"],
           "大学": ["word"], "人民大学": ["word", "org"], "上海": ["word"], "欢迎": ["word"],
           "中国": ["word"], "京天": ["org"]}
LEX_DIM = 3


def lexicon_ids(chars):
    bits = [[0] * len(CLASSES) for _ in chars]
    for i in range(len(chars)):
        for j in range(i + 1, len(chars)):
            for cls in LEXICON.get("".join(chars[i:j + 1]), []):
                c = CLASSES.index(cls)
                bits[i][c] |= 1
                for k in range(i + 1, j):
                    bits[k][c] |= 2
                bits[j][c] |= 4
    return [[c * 8 + b for c, b in enumerate(row)] for row in bits]


def main(out_dir):
    src = os.path.join(out_dir, "tagger-bigram-tiny")
    dst = os.path.join(out_dir, "tagger-lexicon-tiny")
    w32 = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    ref = json.load(open(os.path.join(src, "reference.json")))
    texts = ref["texts"]

    rng = np.random.default_rng(12)
    rows = [[base + lex for base, lex in zip(r, lexicon_ids(list(t)))] for t, r in zip(texts, ref["ids"])]
    b, l = len(texts), max(len(r) for r in rows)
    ids = np.stack([rng.integers(0, cfg["vocab_size"], (b, l)), rng.integers(0, cfg["bigram_vocab_size"], (b, l)),
                    rng.integers(0, cfg["bigram_vocab_size"], (b, l)), rng.integers(0, 8, (b, l)),
                    rng.integers(8, 16, (b, l))], axis=2).astype(np.int64)
    for s, r in enumerate(rows):
        ids[s, :len(r)] = r
    lengths = np.array([len(r) for r in rows], dtype=np.int64)

    hidden = cfg["hidden_size"]
    d_in = cfg["input_dim"] + 2 * cfg["bigram_dim"] + len(CLASSES) * LEX_DIM
    bound = 3.0 / np.sqrt(hidden)
    new = {"lexicon_embedding.weight": rng.standard_normal((len(CLASSES) * 8, LEX_DIM)).astype(np.float32)}
    for suffix in ["", "_reverse"]:
        new[f"lstm.weight_ih_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, d_in)).astype(np.float32)
        new[f"lstm.weight_hh_l0{suffix}"] = rng.uniform(-bound, bound, (4 * hidden, hidden)).astype(np.float32)
        new[f"lstm.bias_ih_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
        new[f"lstm.bias_hh_l0{suffix}"] = rng.uniform(-bound, bound, 4 * hidden).astype(np.float32)
    w = {k: v.astype(np.float64) for k, v in {**w32, **new}.items()}

    lex = w["lexicon_embedding.weight"]
    x = np.concatenate([w["embedding.weight"][ids[:, :, 0]], w["bigram_embedding.weight"][ids[:, :, 1]],
                        w["bigram_embedding.weight"][ids[:, :, 2]], lex[ids[:, :, 3]], lex[ids[:, :, 4]]], axis=2)
    h = bilstm(w, x, lengths, cfg["num_layers"])
    emissions = h @ w["fc.weight"].T + w["fc.bias"]
    start, end, trans = w["crf.start_transitions"], w["crf.end_transitions"], w["crf.transitions"]
    paths = np.full((b, l), -1, dtype=np.int64)
    for s in range(b):
        n = int(lengths[s])
        paths[s, :n] = viterbi(emissions[s], n, start, end, trans)

    os.makedirs(dst, exist_ok=True)
    cfg["lexicon_classes"] = CLASSES
    cfg["lexicon_dim"] = LEX_DIM
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for name in ["tags.json", "vocab.json", "bigrams.json"]:
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "lexicon.txt"), "w", encoding="utf-8") as f:
        for word in sorted(LEXICON):
            f.write(f"{word}\t{','.join(LEXICON[word])}\n")
    save_file({**w32, **new}, os.path.join(dst, "model.safetensors"))
    save_file({"ids": ids, "lengths": lengths, "emissions": emissions.astype(np.float32), "paths": paths},
              os.path.join(dst, "reference.safetensors"))
    json.dump({"texts": texts, "ids": rows}, open(os.path.join(dst, "reference.json"), "w"), ensure_ascii=False, indent=2)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
