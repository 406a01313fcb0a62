#!/usr/bin/env python3
"""NumPy reference for the MPNet text encoder (models/src/bert.rs), written from
transformers' modeling_mpnet.py (MPNetEmbeddings, MPNetSelfAttention, MPNetEncoder's
compute_position_bias and relative_position_bucket), independently of the Rust code; and, with
the same code, RoBERTa's (modeling_roberta.py: BERT's layer, positions counted from
padding_idx + 1 as in create_position_ids_from_input_ids).

Three fixtures:

    # a tiny random MPNet (committed): weights in transformers' names, packed inputs and the
    # expected last hidden states
    python3 scripts/make_mpnet_fixture.py tiny models/tests/fixtures/mpnet-tiny

    # a tiny random RoBERTa (committed), the same way
    python3 scripts/make_mpnet_fixture.py tiny-roberta models/tests/fixtures/roberta-tiny

    # the real all-mpnet-base-v2 (scripts/fetch-mpnet.sh), through its tokenizer.json and
    # sentence-transformers' mean pooling + Normalize: token ids and embeddings of a few
    # sentences (committed; the test runs where the model has been fetched)
    python3 scripts/make_mpnet_fixture.py real model-store/all-mpnet-base-v2 \
        models/tests/fixtures/mpnet_parity.json

Needs numpy and safetensors (and tokenizers for `real`). float32 throughout, as PyTorch runs it.
"""
import json
import math
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

NUM_BUCKETS = 32
MAX_DISTANCE = 128


def relative_position_bucket(relative_position):
    """transformers' MPNetEncoder.relative_position_bucket, in NumPy (float32 logs)."""
    ret = np.zeros_like(relative_position)
    n = -relative_position
    num_buckets = NUM_BUCKETS // 2
    ret += (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    with np.errstate(divide="ignore", invalid="ignore"):
        val_if_large = max_exact + (
            np.log(n.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(MAX_DISTANCE / max_exact))
            * np.float32(num_buckets - max_exact)
        ).astype(np.int64)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    ret += np.where(is_small, n, val_if_large)
    return ret


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps)) * w + b


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    return (0.5 * x * (1.0 + _erf(x.astype(np.float64) / math.sqrt(2.0)))).astype(np.float32)


def linear(x, t, name):
    return x @ t[name + ".weight"].T + t[name + ".bias"]


def mpnet_forward(t, cfg, ids):
    """Last hidden states `[len, hidden]` of one unpadded sequence (no padding: every
    key is a real token, which is what the padded model computes for its real rows).
    MPNet, or RoBERTa when cfg["model_type"] is "roberta" (token types, BERT's names, no
    relative bias)."""
    roberta = cfg["model_type"] == "roberta"
    pad = cfg["pad_token_id"]
    eps = cfg["layer_norm_eps"]
    heads = cfg["num_attention_heads"]
    h = cfg["hidden_size"]
    d = h // heads
    ids = np.asarray(ids)
    # create_position_ids_from_input_ids: cumsum of the non-pad mask, plus padding_idx.
    mask = (ids != pad).astype(np.int64)
    positions = np.cumsum(mask) * mask + pad
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][positions]
    if roberta:
        x = x + t["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps).astype(np.float32)
    n = len(ids)
    # compute_position_bias: memory_position - context_position, bucketed, per head.
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    if roberta:
        bias = np.zeros((heads, n, n), np.float32)
    else:
        bias = t["encoder.relative_attention_bias.weight"][relative_position_bucket(rel)]  # [n, n, heads]
        bias = bias.transpose(2, 0, 1)  # [heads, n, n]
    names = {
        "q": "attention.self.query" if roberta else "attention.attn.q",
        "k": "attention.self.key" if roberta else "attention.attn.k",
        "v": "attention.self.value" if roberta else "attention.attn.v",
        "o": "attention.output.dense" if roberta else "attention.attn.o",
        "ln": "attention.output.LayerNorm" if roberta else "attention.LayerNorm",
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda y: y.reshape(n, heads, d).transpose(1, 0, 2)
        q = split(linear(x, t, p + names["q"]))
        k = split(linear(x, t, p + names["k"]))
        v = split(linear(x, t, p + names["v"]))
        scores = q @ k.transpose(0, 2, 1) / np.float32(math.sqrt(d)) + bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(-1, keepdims=True)
        c = (probs @ v).transpose(1, 0, 2).reshape(n, h)
        o = linear(c, t, p + names["o"])
        x = layer_norm(o + x, t[p + names["ln"] + ".weight"], t[p + names["ln"] + ".bias"], eps)
        inter = gelu(linear(x, t, p + "intermediate.dense"))
        out = linear(inter, t, p + "output.dense")
        x = layer_norm(out + x, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps).astype(np.float32)
    return x


TINY_WORDS = (
    "where is my order refund please cancel the subscription card declined how do i close "
    "this popup price of red blue dress size shipping to canada hello hi thanks want return "
    "it too small can pay with apple track parcel late , ? ! . a"
).split()


def tiny(out_dir, roberta=False):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261203 if roberta else 20261202)
    cfg = {
        "model_type": "roberta" if roberta else "mpnet",
        "architectures": ["RobertaModel" if roberta else "MPNetModel"],
        "vocab_size": 50,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 50,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    if roberta:
        cfg["type_vocab_size"] = 1
    else:
        cfg["relative_attention_num_buckets"] = NUM_BUCKETS
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    r = lambda *shape, s=0.3: (rng.standard_normal(shape) * s).astype(np.float32)
    t = {
        "embeddings.word_embeddings.weight": r(v, h, s=1.0),
        "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], h, s=1.0),
        "embeddings.LayerNorm.weight": 1.0 + r(h, s=0.1),
        "embeddings.LayerNorm.bias": r(h, s=0.1),
    }
    if roberta:
        t["embeddings.token_type_embeddings.weight"] = r(1, h, s=1.0)
    else:
        # Large enough that a wrong bucket moves the output well past the tolerance.
        t["encoder.relative_attention_bias.weight"] = r(NUM_BUCKETS, cfg["num_attention_heads"], s=2.0)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        attn = ["self.query", "self.key", "self.value", "output.dense"] if roberta else ["attn.q", "attn.k", "attn.v", "attn.o"]
        for name in attn:
            t[p + f"attention.{name}.weight"] = r(h, h)
            t[p + f"attention.{name}.bias"] = r(h, s=0.1)
        ln = "attention.output.LayerNorm" if roberta else "attention.LayerNorm"
        t[p + ln + ".weight"] = 1.0 + r(h, s=0.1)
        t[p + ln + ".bias"] = r(h, s=0.1)
        t[p + "intermediate.dense.weight"] = r(f, h)
        t[p + "intermediate.dense.bias"] = r(f, s=0.1)
        t[p + "output.dense.weight"] = r(h, f, s=0.2)
        t[p + "output.dense.bias"] = r(h, s=0.1)
        t[p + "output.LayerNorm.weight"] = 1.0 + r(h, s=0.1)
        t[p + "output.LayerNorm.bias"] = r(h, s=0.1)
    # A WordPiece tokenizer over the 50 ids, shaped as all-mpnet-base-v2's (lower-casing BERT
    # normaliser, <s> ... </s> around every input), so the folder loads as a text encoder.
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["<s>", "<pad>", "</s>", "[UNK]"] + TINY_WORDS
    assert len(vocab) == v, len(vocab)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(out / "tokenizer.json"))
    # Sequences long enough to reach the logarithmic buckets and their edges (offsets 16, 32).
    lens = [1, 5, 17, 40, 9, 33]
    seqs = []
    for n in lens:
        ids = rng.integers(3, v, size=n).tolist()
        if n > 1:
            ids[0], ids[-1] = 0, 2
        seqs.append(ids)
    expected = [mpnet_forward(t, cfg, ids) for ids in seqs]
    save_file(t, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    buckets = {str(k): int(relative_position_bucket(np.array([k]))[0]) for k in range(-140, 141)}
    fixture = {
        "generator": "scripts/make_mpnet_fixture.py " + ("tiny-roberta" if roberta else "tiny"),
        "ids": seqs,
        "hidden": [e.round(7).tolist() for e in expected],
    }
    if not roberta:
        fixture["buckets"] = buckets
    (out / "expected.json").write_text(json.dumps(fixture) + "\n")
    print(f"wrote {out}: {len(seqs)} sequences, lengths {lens}")


SENTENCES = [
    "Does this cream suit sensitive skin?",
    "How do I close this popup?",
    "Where is my order #A-1029384?",
    "I want to return the blue jacket, size M, it is too small.",
    "My card was declined at checkout, why?",
    "cancel my subscription",
    "hi",
    "Love it 😍😍 but the strap broke 💔",
    "Je voudrais échanger la crème hydratante, ça pique.",
    "这款面霜适合敏感肌肤吗？",
    " ".join(["the parcel with my winter boots has not arrived and tracking shows no update"] * 4),
]


def real(model_dir, out_path):
    from tokenizers import Tokenizer

    model_dir = pathlib.Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    t = load_file(str(model_dir / "model.safetensors"))
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # The file pads to 128; sentence-transformers feeds unpadded inputs cut at max_seq_length.
    tok.no_padding()
    tok.enable_truncation(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])
    rows = []
    for s in SENTENCES:
        ids = tok.encode(s).ids
        x = mpnet_forward(t, cfg, ids).astype(np.float64)
        pooled = x.mean(0)
        emb = pooled / np.linalg.norm(pooled)
        rows.append({"text": s, "ids": ids, "embedding": emb.astype(np.float32).round(7).tolist()})
        print(f"{len(ids):4d} tokens  {s[:60]}")
    fixture = {"generator": "scripts/make_mpnet_fixture.py real", "model": "all-mpnet-base-v2", "sentences": rows}
    pathlib.Path(out_path).write_text(json.dumps(fixture) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("tiny", "tiny-roberta"):
        tiny(sys.argv[2], roberta=sys.argv[1] == "tiny-roberta")
    elif len(sys.argv) == 4 and sys.argv[1] == "real":
        real(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
