#!/usr/bin/env python3
"""Reference embeddings for the text-encoder parity test, computed by sentence-transformers.

    python3 scripts/make_parity_fixture.py model-store/all-MiniLM-L6-v2 \
        models/tests/fixtures/minilm_parity.json

Writes, per sentence: the text, whether the test should ask for truncation, the token count
sentence-transformers fed the model (after its own truncation at max_seq_length), the
L2-normalised embedding (the model's full pipeline, Normalize included) and the norm of the
pooled vector before normalisation (so the unnormalised output can be checked too).
Needs: pip install sentence-transformers (CPU is enough).
"""
import json
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

LONG_170 = " ".join(["the parcel with my winter boots has not arrived and tracking shows no update"] * 11)
LONG_400 = " ".join(["I was charged twice for the same order and I would like a refund to my card please"] * 22)

SENTENCES = [
    # English customer-service queries
    ("Does this cream suit sensitive skin?", False),
    ("How do I close this popup?", False),
    ("Where is my order #A-1029384?", False),
    ("I want to return the blue jacket, size M, it is too small.", False),
    ("Can I pay with Apple Pay or only by card?", False),
    ("My card was declined at checkout, why?", False),
    ("Is the 128GB model cheaper than $799 anywhere?", False),
    ("cancel my subscription", False),
    ("hi", False),
    ("What's the difference between the Pro and the Max?", False),
    ("the app keeps crashing when I upload a video!!!", False),
    ("How long does shipping to Canada take?", False),
    ("I received a damaged item, the box was crushed.", False),
    ("Do you have this dress in red, size 38?", False),
    ("Why was I charged a fee for a transfer?", False),
    # Chinese
    ("这款面霜适合敏感肌肤吗？", False),
    ("我的订单什么时候发货？", False),
    ("如何关闭这个弹窗", False),
    ("我想退货，尺码太小了。", False),
    ("这个耳机有黑色的吗？价格是多少？", False),
    # emoji
    ("Love it 😍😍 but the strap broke 💔", False),
    ("🔥🔥 deal?? 🛒", False),
    ("where's my package 📦❓", False),
    # accents and other Latin-script languages
    ("¿Dónde está mi pedido? Ya pasó una semana.", False),
    ("Je voudrais échanger la crème hydratante, ça pique.", False),
    ("Größe L ist ausverkauft – wann kommt Nachschub?", False),
    ("São Paulo entrega grátis?", False),
    ("naïve café crème brûlée", False),
    # mixed scripts, digits, punctuation
    ("iPhone 15 Pro Max 256GB 钛金属 — in stock?", False),
    ("order 20240518-7731 price ¥1,299.00 colour: 深空灰", False),
    # over 128 tokens (the tokenizer.json's own fixed length) but under the model's 256
    (LONG_170, False),
    # over the model's 256-token limit: the test asks for truncation
    (LONG_400, True),
]


def main(model_dir: str, out_path: str) -> None:
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    texts = [s for s, _ in SENTENCES]
    tok = model.tokenizer
    counts = [
        min(len(tok(t, add_special_tokens=True, truncation=False)["input_ids"]), model.max_seq_length)
        for t in texts
    ]
    with torch.no_grad():
        normalized = model.encode(texts, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
        # Transformer + Pooling only: the vector before the Normalize module.
        pooled = model.encode(texts, batch_size=8, convert_to_numpy=True, output_value="sentence_embedding",
                              normalize_embeddings=False) if len(model) < 3 else None
        if pooled is None:
            feats = model.tokenize(texts)
            out = model[1](model[0](feats))
            pooled = out["sentence_embedding"].numpy()
    rows = []
    for (text, truncate), n, emb, raw in zip(SENTENCES, counts, normalized, pooled):
        rows.append({
            "text": text,
            "truncate": truncate,
            "tokens": n,
            "embedding": [float(x) for x in emb],
            "pooled_norm": float((raw ** 2).sum() ** 0.5),
        })
    doc = {
        "model_dir": model_dir,
        "max_seq_length": model.max_seq_length,
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "sentences": rows,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=0)
    print(f"wrote {len(rows)} reference embeddings to {out_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
