#!/usr/bin/env python3
"""Reference outputs for the BiLSTM-CRF tagger parity tests (models/tests/tagger.rs).

    pip install torch safetensors   # CPU is enough
    python3 scripts/make_tagger_fixture.py models/tests/fixtures

Made with torch 2.15.0 (Python 3.11). The CRF below is pytorch-crf's (github.com/kmkurn/pytorch-crf,
torchcrf/__init__.py, 0.7.2) copied in: `_compute_score`, `_compute_normalizer` and
`_viterbi_decode` line for line with batch_first=True, the mask a bool tensor (newer torch refuses
uint8 in torch.where); the Viterbi score, which pytorch-crf computes but does not return, is
returned too. The BiLSTM is PyTorch's own nn.LSTM(bidirectional=True, batch_first=True) over a
packed sequence (pack_padded_sequence, enforce_sorted=False), so its backward direction starts at
each sequence's own last token and padding is zero in its output.

Writes two checkpoint folders (config.json, model.safetensors, tags.json, [vocab.json]) with
reference.safetensors beside them:

  tagger-tiny        encoder-features input: input_dim 12, hidden 8 per direction, 2 layers, 7 BIO
                     tags; emission layer `hidden2tag`.
  tagger-chars-tiny  embeddings input over a character vocab.json (24 entries, <pad> 0, <unk> 1),
                     dim 10, hidden 6, 1 layer, 9 BMES tags; emission layer named `fc` (found by
                     the loader's fallback names). reference.json holds texts whose characters
                     (one unknown) map to the reference ids.

reference.safetensors: `input` (features [B, L, D] f32) or `ids` ([B, L] i64), `lengths` [B],
`emissions` [B, L, T] (padded positions are the emission bias: zero LSTM output there), `paths`
[B, L] (Viterbi; -1 past each length), `path_scores` [B], `log_partition` [B], `gold` [B, L]
(random tags; -1 past each length), `gold_scores` [B], `nll` [B] (log Z - gold score: pytorch-crf's
forward with reduction='none', negated), `nll_mean` [] (reduction='mean', negated) and
`marginals` [B, L, T] (d log Z / d emissions by autograd: zero at padding). Padded input
positions hold random values (not zeros), so a leak of padding into real positions shows.

Weights are random, the LSTM's scaled by 3 from PyTorch's initialisation (so its states are not
all near zero); the CRF's start/end/transition scores are drawn N(0, 0.7^2) and the emission
layer's weight scaled by 15 so transitions and emissions both matter to the best path. Outputs are computed
in float64 from the float32 weights and cast to float32.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class CRF(nn.Module):
    """pytorch-crf's CRF (batch_first=True), methods as in torchcrf/__init__.py."""

    def __init__(self, num_tags):
        super().__init__()
        self.num_tags = num_tags
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        nn.init.uniform_(self.start_transitions, -0.1, 0.1)
        nn.init.uniform_(self.end_transitions, -0.1, 0.1)
        nn.init.uniform_(self.transitions, -0.1, 0.1)

    def forward(self, emissions, tags, mask, reduction="sum"):
        emissions, tags, mask = emissions.transpose(0, 1), tags.transpose(0, 1), mask.transpose(0, 1)
        numerator = self._compute_score(emissions, tags, mask)
        denominator = self._compute_normalizer(emissions, mask)
        llh = numerator - denominator
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        if reduction == "mean":
            return llh.mean()
        assert reduction == "token_mean"
        return llh.sum() / mask.float().sum()

    def decode(self, emissions, mask):
        return self._viterbi_decode(emissions.transpose(0, 1), mask.transpose(0, 1))

    def normalizer(self, emissions, mask):
        return self._compute_normalizer(emissions.transpose(0, 1), mask.transpose(0, 1))

    def score(self, emissions, tags, mask):
        return self._compute_score(emissions.transpose(0, 1), tags.transpose(0, 1), mask.transpose(0, 1))

    def _compute_score(self, emissions, tags, mask):
        assert mask[0].all()
        seq_length, batch_size = tags.shape
        mask = mask.to(emissions.dtype)
        score = self.start_transitions[tags[0]]
        score = score + emissions[0, torch.arange(batch_size), tags[0]]
        for i in range(1, seq_length):
            score = score + self.transitions[tags[i - 1], tags[i]] * mask[i]
            score = score + emissions[i, torch.arange(batch_size), tags[i]] * mask[i]
        seq_ends = mask.long().sum(dim=0) - 1
        last_tags = tags[seq_ends, torch.arange(batch_size)]
        score = score + self.end_transitions[last_tags]
        return score

    def _compute_normalizer(self, emissions, mask):
        assert mask[0].all()
        seq_length = emissions.size(0)
        score = self.start_transitions + emissions[0]
        for i in range(1, seq_length):
            broadcast_score = score.unsqueeze(2)
            broadcast_emissions = emissions[i].unsqueeze(1)
            next_score = broadcast_score + self.transitions + broadcast_emissions
            next_score = torch.logsumexp(next_score, dim=1)
            score = torch.where(mask[i].unsqueeze(1), next_score, score)
        score = score + self.end_transitions
        return torch.logsumexp(score, dim=1)

    def _viterbi_decode(self, emissions, mask):
        assert mask[0].all()
        seq_length, batch_size = mask.shape
        score = self.start_transitions + emissions[0]
        history = []
        for i in range(1, seq_length):
            broadcast_score = score.unsqueeze(2)
            broadcast_emission = emissions[i].unsqueeze(1)
            next_score = broadcast_score + self.transitions + broadcast_emission
            next_score, indices = next_score.max(dim=1)
            score = torch.where(mask[i].unsqueeze(1), next_score, score)
            history.append(indices)
        score = score + self.end_transitions
        seq_ends = mask.long().sum(dim=0) - 1
        best_tags_list, best_scores = [], []
        for idx in range(batch_size):
            best_score, best_last_tag = score[idx].max(dim=0)
            best_tags = [best_last_tag.item()]
            for hist in reversed(history[:seq_ends[idx]]):
                best_last_tag = hist[idx][best_tags[-1]]
                best_tags.append(best_last_tag.item())
            best_tags.reverse()
            best_tags_list.append(best_tags)
            best_scores.append(best_score)
        return best_tags_list, torch.stack(best_scores)


class BiLstmCrf(nn.Module):
    def __init__(self, input_dim, hidden, layers, num_tags, vocab_size=None, emission_name="hidden2tag"):
        super().__init__()
        if vocab_size is not None:
            self.embedding = nn.Embedding(vocab_size, input_dim)
        self.lstm = nn.LSTM(input_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.emission_name = emission_name
        setattr(self, emission_name, nn.Linear(2 * hidden, num_tags))
        self.crf = CRF(num_tags)

    def emissions(self, x, lengths):
        if hasattr(self, "embedding"):
            x = self.embedding(x)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return getattr(self, self.emission_name)(out)


def randomise(model, gen):
    with torch.no_grad():
        for p in model.lstm.parameters():
            p.mul_(3.0)
        for p in (model.crf.start_transitions, model.crf.end_transitions, model.crf.transitions):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        getattr(model, model.emission_name).weight.mul_(15.0)


def write(out_dir, name, model, config, tags, x, lengths, gen, vocab=None, extra_json=None):
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, "model.safetensors"))
    for fname, obj in [("config.json", config), ("tags.json", tags)] + ([("vocab.json", vocab)] if vocab else []):
        with open(os.path.join(folder, fname), "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")

    m = model.double().eval()
    b, l = x.shape[:2]
    mask = torch.arange(l)[None, :] < lengths[:, None]
    gold = torch.randint(0, len(tags), (b, l), generator=gen)
    xin = x.double() if x.is_floating_point() else x
    em = m.emissions(xin, lengths).detach().requires_grad_(True)
    log_z = m.crf.normalizer(em, mask)
    log_z.sum().backward()
    marginals = em.grad.clone()
    with torch.no_grad():
        paths, path_scores = m.crf.decode(em, mask)
        gold_scores = m.crf.score(em, gold, mask)
        nll = -m.crf(em, gold, mask, reduction="none")
        nll_mean = -m.crf(em, gold, mask, reduction="mean")
    pad = lambda rows: torch.tensor([r + [-1] * (l - len(r)) for r in rows], dtype=torch.int64)
    gold = torch.where(mask, gold, torch.full_like(gold, -1))
    ref = {
        "lengths": lengths.to(torch.int64),
        "emissions": em.detach().float(),
        "paths": pad(paths),
        "path_scores": path_scores.float(),
        "log_partition": log_z.detach().float(),
        "gold": gold,
        "gold_scores": gold_scores.float(),
        "nll": nll.float(),
        "nll_mean": nll_mean.float(),
        "marginals": marginals.float(),
    }
    ref["input" if x.is_floating_point() else "ids"] = x.float() if x.is_floating_point() else x.to(torch.int64)
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"))
    if extra_json is not None:
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump(extra_json, f, indent=2, ensure_ascii=False)
            f.write("\n")
    print(f"{name}: paths {paths}, |emissions|max {em.abs().max():.3f}, log Z {log_z.tolist()}")


def main(out_dir):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)

    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    model = BiLstmCrf(input_dim=12, hidden=8, layers=2, num_tags=len(tags))
    randomise(model, gen)
    lengths = torch.tensor([9, 5, 1, 7])
    x = torch.randn(4, 9, 12, generator=gen)
    config = {"input": "encoder", "input_dim": 12, "hidden_size": 8, "num_layers": 2, "dropout": 0.1,
              "num_tags": len(tags)}
    write(out_dir, "tagger-tiny", model, config, tags, x, lengths, gen)

    chars = "北京上海天安门欢迎你我爱中国人民大学长城东西"
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(dict.fromkeys(chars))}}
    assert len(vocab) == 24, len(vocab)
    kinds = ["PER", "LOC"]
    tags = ["O"] + [f"{p}-{k}" for k in kinds for p in "BMES"]
    model = BiLstmCrf(input_dim=10, hidden=6, layers=1, num_tags=len(tags), vocab_size=len(vocab), emission_name="fc")
    randomise(model, gen)
    texts = ["我爱北京天安门", "欢迎你", "上海人民大学", "中国"]
    texts_ids = [[vocab.get(c, 1) for c in t] for t in texts]
    texts.append("北京烤鸭")  # 烤鸭 are not in the vocabulary: the unknown id
    texts_ids.append([vocab["北"], vocab["京"], 1, 1])
    lengths = torch.tensor([len(t) for t in texts_ids])
    l = int(lengths.max())
    # Padding ids are random real ids, not <pad>, so a leak would show.
    ids = torch.randint(0, len(vocab), (len(texts), l), generator=gen)
    for i, row in enumerate(texts_ids):
        ids[i, : len(row)] = torch.tensor(row)
    config = {"input": "embeddings", "input_dim": 10, "vocab_size": len(vocab), "hidden_size": 6, "num_layers": 1,
              "num_tags": len(tags), "scheme": "bmes"}
    write(out_dir, "tagger-chars-tiny", model, config, tags, ids, lengths, gen, vocab=vocab,
          extra_json={"texts": texts, "ids": texts_ids})


if __name__ == "__main__":
    print("torch", torch.__version__)
    main(sys.argv[1] if len(sys.argv) > 1 else "models/tests/fixtures")
