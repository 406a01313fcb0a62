#!/usr/bin/env python3
"""Reference outputs for the intent-aware (joint intent) tagger (models/tests/tagger.rs).

    pip install numpy safetensors
    python3 scripts/make_tagger_intent_fixture.py models/tests/fixtures

Builds `tagger-intent-tiny` from `tagger-tiny` (made by make_tagger_fixture.py with PyTorch): the
same BiLSTM, emission layer and CRF, plus the joint-intent layers of an intent-aware tagger
(`num_intents` in config.json, names in intents.json):

    mean      = sum_t h[b, t] / length[b]                      (h: BiLSTM output, zero at padding)
    logits    = intent.weight @ mean + intent.bias             [B, I]
    emissions = hidden2tag(h) + intent_emission.weight @ softmax(logits)   (every position)

The reference runs in float64 with NumPy. Its BiLSTM (nn.LSTM's equations: gates i, f, g, o;
bidirectional, the backward direction starting at each sequence's own last token, as a packed
sequence) and its Viterbi are first checked against tagger-tiny's PyTorch reference (emissions
within 1e-5, the same paths), so the new outputs stand on PyTorch's.

Writes tagger-intent-tiny/{config.json, tags.json, intents.json, model.safetensors,
reference.safetensors}; reference.safetensors holds `input`, `lengths`, `intent_logits` [B, I],
`emissions` [B, L, T] and `paths` [B, L] (-1 past each length), float32 / int64.
"""
import json
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def lstm_direction(x, n, w_ih, w_hh, b_ih, b_hh):
    """One direction over x[:n] ([n, D]); returns [n, H]."""
    hidden = w_hh.shape[1]
    h = np.zeros(hidden)
    c = np.zeros(hidden)
    out = np.zeros((n, hidden))
    for t in range(n):
        g = w_ih @ x[t] + b_ih + w_hh @ h + b_hh
        i, f, gg, o = np.split(g, 4)
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))
        c = sig(f) * c + sig(i) * np.tanh(gg)
        h = sig(o) * np.tanh(c)
        out[t] = h
    return out


def bilstm(w, x, lengths, num_layers):
    b, l, _ = x.shape
    hidden = w["lstm.weight_hh_l0"].shape[1]
    out = np.zeros((b, l, 2 * hidden))
    for s in range(b):
        n = int(lengths[s])
        h = x[s, :n]
        for k in range(num_layers):
            p = lambda name, suffix="": w[f"lstm.{name}_l{k}{suffix}"]
            fwd = lstm_direction(h, n, p("weight_ih"), p("weight_hh"), p("bias_ih"), p("bias_hh"))
            r = "_reverse"
            bwd = lstm_direction(h[::-1], n, p("weight_ih", r), p("weight_hh", r), p("bias_ih", r), p("bias_hh", r))[::-1]
            h = np.concatenate([fwd, bwd], axis=1)
        out[s, :n] = h
    return out


def viterbi(em, n, start, end, trans):
    score = start + em[0]
    back = []
    for t in range(1, n):
        total = score[:, None] + trans + em[t][None, :]
        back.append(total.argmax(0))
        score = total.max(0)
    score = score + end
    best = [int(score.argmax())]
    for bp in reversed(back):
        best.append(int(bp[best[-1]]))
    return best[::-1]


def main(out_dir):
    src = os.path.join(out_dir, "tagger-tiny")
    dst = os.path.join(out_dir, "tagger-intent-tiny")
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    w32 = load_file(os.path.join(src, "model.safetensors"))
    ref = load_file(os.path.join(src, "reference.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    x = ref["input"].astype(np.float64)
    lengths = ref["lengths"]
    b, l, _ = x.shape

    h = bilstm(w, x, lengths, cfg["num_layers"])
    base = h @ w["hidden2tag.weight"].T + w["hidden2tag.bias"]
    err = np.abs(base - ref["emissions"]).max()
    assert err < 1e-5, f"the NumPy BiLSTM is {err} from PyTorch's emissions"
    start, end, trans = w["crf.start_transitions"], w["crf.end_transitions"], w["crf.transitions"]
    for s in range(b):
        n = int(lengths[s])
        assert viterbi(ref["emissions"][s].astype(np.float64), n, start, end, trans) == list(ref["paths"][s, :n]), s
    print(f"NumPy BiLSTM within {err:.2e} of PyTorch; Viterbi paths equal", file=sys.stderr)

    rng = np.random.default_rng(7)
    intents = ["ask_price", "ask_size", "ground_service", "order_status", "other"]
    n_int = len(intents)
    two_h = h.shape[2]
    new = {
        "intent.weight": (rng.standard_normal((n_int, two_h)) * 2.0).astype(np.float32),
        "intent.bias": (rng.standard_normal(n_int) * 0.5).astype(np.float32),
        # Large enough that the intent term changes best paths.
        "intent_emission.weight": (rng.standard_normal((cfg["num_tags"], n_int)) * 6.0).astype(np.float32),
    }
    w.update({k: v.astype(np.float64) for k, v in new.items()})

    mean = h.sum(1) / lengths[:, None].astype(np.float64)
    logits = mean @ w["intent.weight"].T + w["intent.bias"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    emissions = base + (probs @ w["intent_emission.weight"].T)[:, None, :]
    paths = np.full((b, l), -1, dtype=np.int64)
    changed = 0
    for s in range(b):
        n = int(lengths[s])
        p = viterbi(emissions[s], n, start, end, trans)
        paths[s, :n] = p
        changed += p != list(ref["paths"][s, :n])
    assert changed > 0, "the intent term changed no path: scale intent_emission up"
    print(f"{changed} of {b} paths differ from the plain tagger's", file=sys.stderr)

    os.makedirs(dst, exist_ok=True)
    cfg["num_intents"] = n_int
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    shutil.copy(os.path.join(src, "tags.json"), os.path.join(dst, "tags.json"))
    json.dump(intents, open(os.path.join(dst, "intents.json"), "w"), indent=2)
    save_file({**w32, **new}, os.path.join(dst, "model.safetensors"))
    save_file(
        {
            "input": ref["input"],
            "lengths": ref["lengths"],
            "intent_logits": logits.astype(np.float32),
            "emissions": emissions.astype(np.float32),
            "paths": paths,
        },
        os.path.join(dst, "reference.safetensors"),
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
