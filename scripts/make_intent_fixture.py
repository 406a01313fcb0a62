#!/usr/bin/env python3
"""A tiny Hugging Face BertForSequenceClassification (an intent classifier) and its reference
outputs, for the sequence-classification parity test.

    pip install torch transformers safetensors   # CPU is enough; plain PyPI wheels
    python3 scripts/make_intent_fixture.py models/tests/fixtures/tiny-bert-seqcls

Made with Python 3.11.7, torch 2.15.0 (the PyPI build, run on CPU), transformers 5.23.0,
tokenizers 0.23.3, safetensors 0.8.0. Seeded, so a rerun with the same versions gives the same
files.

Writes into the folder given (created if missing; the files named here are overwritten):

  config.json          transformers' BertConfig as save_pretrained writes it: hidden 32, 2 layers,
                       4 heads, intermediate 64, 64 positions, 2 token types, gelu, and
                       id2label/label2id {0: card_arrival, 1: lost_or_stolen_card,
                       2: exchange_rate, 3: oos}
  model.safetensors    model.save_pretrained(safe_serialization=True), float32, Hugging Face's
                       own names: bert.embeddings.*, bert.encoder.layer.N.*, bert.pooler.dense.*,
                       classifier.*
  vocab.txt            the WordPiece vocabulary (VOCAB below, one token a line, [PAD] = 0)
  tokenizer.json       a BertTokenizerFast over vocab.txt (lower-casing BertNormalizer,
                       BertPreTokenizer, WordPiece with [UNK], "[CLS] $A [SEP]" post-processor),
                       saved with save_pretrained; no padding, no truncation
  tokenizer_config.json  what save_pretrained writes beside it (small; tokenizer.json is enough)
  reference.json       for each of SENTENCES: {"text", "ids", "type_ids", "logits" [4],
                       "probs" [4] (softmax of the logits), "last_hidden_state_cls" [32] (the
                       [CLS] row of the encoder's last hidden state), "pooled" [32] (pooler
                       output)}; ids come from the saved tokenizer.json, with [CLS] and [SEP]

Weights: BertForSequenceClassification(config) after torch.manual_seed(0), then every parameter
redrawn wider than BERT's std-0.02 init (embeddings std 1, weight matrices std 0.25, biases std
0.1, LayerNorm weight 1 + 0.2 * N(0, 1) and bias 0.1 * N(0, 1)), because with the default init
every token looks alike and all four probabilities sit at 0.25, so a wrong op would go unseen.
The reference runs in eval() mode, one sentence at a time (no padding, attention mask all ones),
in float64 (model.double()), and is cast to float32 when written. At the end the saved folder is
reloaded with from_pretrained (float32) and its logits checked against the reference.

Note: in transformers 5 BertTokenizerFast is BertTokenizer (tokenizers-backed) and silently
ignores vocab_file=; the vocabulary is passed as vocab= (a dict) here, and its size checked.
"""
import json
import os
import sys

import safetensors
import tokenizers
import torch
import transformers
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

LABELS = ["card_arrival", "lost_or_stolen_card", "exchange_rate", "oos"]

# Mixed case and a "?" exercise the lower-casing normalizer and the punctuation split.
# "arrived" -> arrive ##d and "exchange" -> ex ##change are split into pieces; in the nonsense
# sentence "zzz" -> z ##z ##z, while "blorp" and "qwerty" have no WordPiece split -> [UNK].
SENTENCES = [
    "My card has not arrived yet",
    "i lost my card",
    "What is the exchange rate?",
    "blorp zzz qwerty",
]

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + """
. , ? ! '
i my your the a an is it was has have not no yet what when where how why can to of in on
card cards arrive lost stolen stole ex rate rates money transfer euro pound dollar new get
hello hi please help thanks z
##d ##s ##ed ##ing ##n ##change ##z ##ly
""".split()


def widen(model: torch.nn.Module) -> None:
    """Redraws every parameter wider than BERT's default init, LayerNorms included."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("LayerNorm.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def f32(t: torch.Tensor) -> list:
    return [float(x) for x in t.to(torch.float32).reshape(-1)]


def main(out: str) -> None:
    assert len(VOCAB) == len(set(VOCAB)), "duplicate token in VOCAB"
    os.makedirs(out, exist_ok=True)

    vocab_path = os.path.join(out, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    with open(vocab_path, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=64)
    assert len(tok) == len(VOCAB), (len(tok), len(VOCAB))
    tok.save_pretrained(out)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
        pad_token_id=VOCAB.index("[PAD]"),
        id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
    )
    model = BertForSequenceClassification(config)
    widen(model)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)  # float32: before model.double()

    print("model.safetensors:")
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.float32, (k, t.dtype)
            print(f"  {k:60s} {list(t.shape)}")
    for k in ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]:
        assert k in keys, f"{k} missing from model.safetensors"

    # Tokenize with the saved tokenizer.json itself, as a reader that has only that file would.
    saved_tok = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    model = model.double()
    rows = []
    for text in SENTENCES:
        enc = saved_tok.encode(text)
        assert enc.ids == tok(text)["input_ids"], (text, enc.ids)
        ids = torch.tensor([enc.ids])
        type_ids = torch.tensor([enc.type_ids])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = model(input_ids=ids, token_type_ids=type_ids, attention_mask=mask).logits[0]
            bert_out = model.bert(input_ids=ids, token_type_ids=type_ids, attention_mask=mask)
            assert torch.allclose(model.classifier(bert_out.pooler_output)[0], logits, atol=1e-12)
        rows.append({
            "text": text,
            "ids": list(enc.ids),
            "type_ids": list(enc.type_ids),
            "logits": f32(logits),
            "probs": f32(torch.softmax(logits, dim=-1)),
            "last_hidden_state_cls": f32(bert_out.last_hidden_state[0, 0]),
            "pooled": f32(bert_out.pooler_output[0]),
        })
        print(f"{text!r}\n  tokens {enc.tokens}\n  ids {enc.ids}\n"
              f"  logits {[round(x, 4) for x in rows[-1]['logits']]}  "
              f"-> {LABELS[int(logits.argmax())]} ({max(rows[-1]['probs']):.3f})")
    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")

    # Sanity: the folder as saved, reloaded the ordinary way, in float32.
    reloaded = BertForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.id2label == dict(enumerate(LABELS)), reloaded.config.id2label
    worst = 0.0
    for row in rows:
        ids = torch.tensor([row["ids"]])
        with torch.no_grad():
            got = reloaded(input_ids=ids, token_type_ids=torch.tensor([row["type_ids"]]),
                           attention_mask=torch.ones_like(ids)).logits[0]
        worst = max(worst, float((got - torch.tensor(row["logits"])).abs().max()))
    print(f"reloaded float32 logits vs reference: max abs diff {worst:.2e}")
    assert worst < 1e-5, worst

    print(f"wrote {out} (torch {torch.__version__}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, safetensors {safetensors.__version__}):")
    for name in sorted(os.listdir(out)):
        print(f"  {name:24s} {os.path.getsize(os.path.join(out, name)):7d} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
