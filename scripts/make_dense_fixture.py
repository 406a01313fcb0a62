#!/usr/bin/env python3
"""A tiny sentence-transformers model with a Dense projection, and its reference embeddings,
for models/tests/dense.rs.

    python3 scripts/make_dense_fixture.py [MODEL_DIR] [JSON]
    # defaults: models/tests/fixtures/tiny-st-dense  models/tests/fixtures/tiny_st_dense.json

Makes, with random weights (seeded, so a rerun with the same versions gives the same files):
  Transformer  BERT, hidden 32, 2 layers, 2 heads, intermediate 64, 64 positions, and a
               WordPiece tokenizer over a vocabulary built here (a few hundred tokens,
               lower-cased, accents stripped), so the folder stays a few hundred KB
  Pooling      mean
  Dense        32 -> 16, bias, Tanh
  Normalize
saved with model.save() (safetensors, the Dense in 2_Dense/), and for each of the SENTENCES:
the token ids sentence-transformers fed the model, the vector before Normalize ("dense") and the
model's full output ("embedding"). Weights are drawn wider than BERT's default initialisation
(std 0.02 makes every token look alike) so that the test can tell a wrong op from a right one.

Made with: python 3.11, torch 2.15.0 (the PyPI build, run on CPU), transformers 5.23.0,
sentence-transformers 6.2.0, tokenizers 0.23.3 (the versions are also written into the JSON).
sentence-transformers 6 writes its newer forms (module types such as
sentence_transformers.base.modules.dense.Dense, "pooling_mode": "mean"); the test rewrites a
copy into the classic forms (sentence_transformers.models.Dense, pooling_mode_mean_tokens)
that most Hub checkpoints have, and checks both.
Needs: pip install torch sentence-transformers (the CPU build of torch is enough).
"""
import json
import os
import shutil
import sys
import tempfile

import sentence_transformers
import tokenizers
import torch
import transformers
from sentence_transformers import SentenceTransformer, models
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import BertConfig, BertModel, BertTokenizerFast

SENTENCES = [
    "Where is my order?",
    "I want to return the blue jacket, it is too small.",
    "cancel my subscription",
    "hi",
    "Je voudrais échanger la crème, ça pique.",
    "naïve café crème brûlée",
    # "zyxwvut" is not a word of the vocabulary (WordPiece splits it into pieces);
    # the Chinese characters and the emoji are not in it at all ([UNK]).
    "the zyxwvut arrived broken 📦 快递",
    "Can I pay by card or only in cash? 42 euros.",
]

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """
the a an and or but to of in on at by for with from is are was were be been it its this that
i you he she we they my your our their me him her us them what where when why how who which
can could would should will do does did have has had not no yes only too very so
order orders return returned refund pay paid card cash money price euros dollars
blue red green black white small large jacket dress shoes size box item items
cancel subscription account help please thanks thank hi hello want need like love
arrived arrive broken damaged late shipping delivery parcel package week weeks day days
je voudrais echanger la le les creme ca pique naive cafe brulee de et un une est
""".split()
PUNCT = list(".,!?;:'\"-()#&$%/@")
DIGITS = list("0123456789")
LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def build_tokenizer(path: str) -> BertTokenizerFast:
    vocab = []
    for tok in SPECIAL + PUNCT + DIGITS + LETTERS + ["##" + c for c in LETTERS + DIGITS] + WORDS:
        if tok not in vocab:
            vocab.append(tok)
    vocab += ["##s", "##ed", "##ing", "##er", "##ly"]
    vocab = list(dict.fromkeys(vocab))
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))],
    )
    tok.decoder = tokenizers.decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)
    fast.save_pretrained(path)
    return fast


def widen(module: torch.nn.Module) -> None:
    """Redraws every parameter wider than BERT's init, LayerNorms included."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def main(model_dir: str, out_path: str) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        fast = build_tokenizer(tmp)
        cfg = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_act="gelu")
        bert = BertModel(cfg, add_pooling_layer=False)
        widen(bert)
        bert.save_pretrained(tmp, safe_serialization=True)
        transformer = models.Transformer(tmp, max_seq_length=64)
        pooling = models.Pooling(32, pooling_mode="mean")
        dense = models.Dense(32, 16, bias=True, activation_function=torch.nn.Tanh())
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            dense.linear.weight.copy_(0.15 * torch.randn(dense.linear.weight.shape, generator=g))
            dense.linear.bias.copy_(0.1 * torch.randn(dense.linear.bias.shape, generator=g))
        model = SentenceTransformer(modules=[transformer, pooling, dense, models.Normalize()], device="cpu")
        model.eval()
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        model.save(model_dir, safe_serialization=True)
    # The model card and the tokenizer's other copies are not read by the Rust side.
    for f in ["README.md", "vocab.txt"]:
        p = os.path.join(model_dir, f)
        if os.path.exists(p):
            os.remove(p)

    model = SentenceTransformer(model_dir, device="cpu")
    with torch.no_grad():
        embedding = model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=False)
        feats = model.tokenize(SENTENCES)
        before_norm = model[2](model[1](model[0](dict(feats))))["sentence_embedding"]
    rows = []
    for i, text in enumerate(SENTENCES):
        mask = feats["attention_mask"][i].bool()
        rows.append({
            "text": text,
            "ids": [int(t) for t in feats["input_ids"][i][mask]],
            "dense": [float(x) for x in before_norm[i]],
            "embedding": [float(x) for x in embedding[i]],
        })
    doc = {
        "model_dir": os.path.relpath(model_dir, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")),
        "dimension": model.get_sentence_embedding_dimension(),
        "max_seq_length": model.max_seq_length,
        "modules": [type(m).__name__ for m in model],
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "sentences": rows,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=0)
    print(f"wrote {model_dir} and {len(rows)} reference embeddings to {out_path}")


if __name__ == "__main__":
    if len(sys.argv) not in (1, 3):
        sys.exit(__doc__)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "tests", "fixtures")
    main(*(sys.argv[1:] or [os.path.join(root, "tiny-st-dense"), os.path.join(root, "tiny_st_dense.json")]))
