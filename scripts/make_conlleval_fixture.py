#!/usr/bin/env python3
"""Writes models/tests/fixtures/conlleval/{bio,bioes,bmes}.json: gold and predicted tag
sequences (hand-picked ill-formed ones and seeded random corpora) with the spans and scores
that seqeval 1.2.2 gives in its default mode, which follows conlleval's chunk rules
(startOfChunk/endOfChunk, extended for IOBES). models/tests/conlleval.rs holds
concierge_models::sequence to them: counts and spans exactly, ratios within 1e-9.

seqeval has no M-: BMES tags go to it with M- read as I- (the same letter in IOBES).
seqeval is needed only to rerun this, never to build or test; where the PyPI port `conlleval`
0.2 is importable too, its chunk counts are asserted to agree:
    python3 -m pip install --target /tmp/seqeval-py seqeval==1.2.2 conlleval==0.2
    PYTHONPATH=/tmp/seqeval-py python3 scripts/make_conlleval_fixture.py
"""
import json
import os
import random
import sys
from collections import defaultdict

from importlib.metadata import version

from seqeval.metrics import accuracy_score
from seqeval.metrics.sequence_labeling import get_entities, precision_recall_fscore_support

assert version("seqeval") == "1.2.2", version("seqeval")

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "models", "tests", "fixtures", "conlleval")
LABELS = ["PER", "LOC", "ORG", "fromloc.city_name", "x-y"]
LETTERS = {"bio": "BI", "bioes": "BIES", "bmes": "BMES"}


def for_seqeval(tags):
    return ["I-" + t[2:] if t.startswith("M-") else t for t in tags]


def well_formed(rng, n, scheme):
    """Random non-overlapping spans written in `scheme`."""
    tags, i = ["O"] * n, 0
    while i < n:
        if rng.random() < 0.45:
            length = min(n - i, rng.choice([1, 1, 2, 2, 3, 4]))
            label = rng.choice(LABELS)
            for k in range(length):
                if scheme == "bio":
                    letter = "B" if k == 0 else "I"
                elif length == 1:
                    letter = "S"
                else:
                    letter = "B" if k == 0 else "E" if k == length - 1 else ("M" if scheme == "bmes" else "I")
                tags[i + k] = f"{letter}-{label}"
            i += length + (1 if rng.random() < 0.3 else 0)
        else:
            i += 1
    return tags


def random_tag(rng, scheme):
    if rng.random() < 0.3:
        return "O"
    return f"{rng.choice(LETTERS[scheme])}-{rng.choice(LABELS)}"


def corrupt(rng, tags, scheme, rate):
    """A plausible prediction: mostly the gold tags, some replaced, some spans shifted."""
    pred = list(tags)
    for i in range(len(pred)):
        r = rng.random()
        if r < rate:
            pred[i] = random_tag(rng, scheme)
        elif r < rate * 1.5 and i + 1 < len(pred):
            pred[i], pred[i + 1] = pred[i + 1], pred[i]
        elif r < rate * 2 and pred[i] != "O":
            pred[i] = pred[i][:2] + rng.choice(LABELS)
    return pred


def tricky(scheme):
    """Hand-picked ill-formed or awkward pairs (gold, pred), one sentence each."""
    common = [
        ("O I-PER I-PER O", "B-PER I-PER I-PER O"),
        ("B-PER I-LOC I-LOC", "B-PER B-LOC I-LOC"),
        ("I-A I-B I-A", "B-A I-A I-A"),
        ("B-PER I-PER O B-LOC", "B-PER I-PER B-LOC I-LOC"),
        ("B-PER I-PER", "B-LOC I-LOC"),
        ("O O O", "O I-ORG O"),
        ("", ""),
        ("B-x-y I-x-y B-fromloc.city_name", "B-x-y I-x-y I-fromloc.city_name"),
        ("B-A B-A I-A", "B-A I-A I-A"),
    ]
    if scheme == "bio":
        extra = [("I-PER O", "I-PER O"), ("B-A I-A I-B I-B", "B-A I-A B-B I-B")]
    else:
        extra = [
            ("M-PER E-PER O", "B-PER E-PER O"),
            ("E-PER O S-LOC", "S-PER O S-LOC"),
            ("E-A E-A", "B-A E-A"),
            ("S-A E-A", "S-A S-A"),
            ("B-A E-A M-A E-A", "B-A M-A M-A E-A"),
            ("B-A B-A E-A", "B-A M-A E-A"),
            ("B-A M-A O B-A M-A", "B-A E-A O B-A E-A"),
            ("I-A S-A I-A", "S-A S-A S-A"),
            ("B-A M-B E-A", "B-A E-B S-A"),
            ("B-X M-X I-X E-X", "B-X I-X M-X E-X"),
        ]
        if scheme == "bioes":
            extra = [(g.replace("M-", "I-"), p.replace("M-", "I-")) for g, p in extra]
    return [(g.split(), p.split()) for g, p in common + extra]


def cross_check(gold, pred, out, counts):
    """Where the PyPI port `conlleval` 0.2 is importable, its streaming count (conlleval.pl's
    in-chunk state machine, not span sets) must give the same chunk counts."""
    try:
        import conlleval
    except ImportError:
        return
    lines = []
    for gs, ps in zip(gold, pred):
        if gs:  # the port takes the number of fields from its first line: no empty ones
            lines += [f"w {g} {p}" for g, p in zip(for_seqeval(gs), for_seqeval(ps))] + [""]
    r = conlleval.evaluate(lines)
    s = r["overall"]["chunks"]["stats"]
    assert (s["gold"], s["pred"], s["correct"]) == (out["gold"], out["found"], out["correct"]), (s, out)
    for label, c in r["slots"]["chunks"].items():
        c = c["stats"]
        mine = counts.get(label, {"gold": 0, "found": 0, "correct": 0})
        assert (c["gold"], c["pred"], c["correct"]) == tuple(mine.values()), (label, c, mine)
    CROSS_CHECKED[0] += 1


CROSS_CHECKED = [0]


def expected(gold, pred):
    sg, sp = [for_seqeval(s) for s in gold], [for_seqeval(s) for s in pred]
    spans = lambda seqs: [[[t, s, e + 1] for t, s, e in get_entities(x)] for x in seqs]
    counts = defaultdict(lambda: {"gold": 0, "found": 0, "correct": 0})
    g_all, p_all = set(get_entities(sg)), set(get_entities(sp))
    for t, _, _ in g_all:
        counts[t]["gold"] += 1
    for e in p_all:
        counts[e[0]]["found"] += 1
        counts[e[0]]["correct"] += e in g_all
    out = {
        "gold_spans": spans(sg),
        "pred_spans": spans(sp),
        "tokens": sum(map(len, gold)),
        "correct_tags": sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p)),
        "gold": len(g_all),
        "found": len(p_all),
        "correct": len(g_all & p_all),
    }
    cross_check(gold, pred, out, counts)
    if out["tokens"]:
        out["accuracy"] = accuracy_score(gold, pred)  # whole tags as written, M- included
    if counts:
        p, r, f, s = precision_recall_fscore_support(sg, sp, average="micro", zero_division=0)
        out.update(precision=float(p), recall=float(r), f1=float(f))
        p, r, f, s = precision_recall_fscore_support(sg, sp, average=None, zero_division=0)
        labels = sorted(counts)
        out["per_label"] = [
            dict(label=l, precision=float(p[i]), recall=float(r[i]), f1=float(f[i]), support=int(s[i]), **counts[l])
            for i, l in enumerate(labels)
        ]
    return out


def cases(scheme, seed):
    rng = random.Random(seed)
    out = []
    for i, (g, p) in enumerate(tricky(scheme)):
        out.append(dict(name=f"tricky {i}", gold=[g], pred=[p]))
    out.append(dict(name="all tricky as one corpus", gold=[g for g, _ in tricky(scheme)], pred=[p for _, p in tricky(scheme)]))
    for i in range(6):
        lens = [rng.randint(0, 14) for _ in range(rng.randint(1, 25))]
        gold = [well_formed(rng, n, scheme) for n in lens]
        pred = [corrupt(rng, g, scheme, rate=[0.02, 0.08, 0.2][i % 3]) for g in gold]
        out.append(dict(name=f"corrupted {i}", gold=gold, pred=pred))
    for i in range(6):
        lens = [rng.randint(0, 12) for _ in range(rng.randint(1, 20))]
        gold = [[random_tag(rng, scheme) for _ in range(n)] for n in lens]
        pred = [[random_tag(rng, scheme) for _ in range(n)] for n in lens]
        out.append(dict(name=f"random {i}", gold=gold, pred=pred))
    for c in out:
        c["expected"] = expected(c["gold"], c["pred"])
    return out


os.makedirs(OUT, exist_ok=True)
for seed, scheme in enumerate(["bio", "bioes", "bmes"]):
    doc = {
        "about": "expected values from seqeval 1.2.2 default (conlleval) mode; "
                 "spans are [label, start, end exclusive]; written by scripts/make_conlleval_fixture.py",
        "scheme": scheme,
        "cases": cases(scheme, 1000 + seed),
    }
    path = os.path.join(OUT, f"{scheme}.json")
    with open(path, "w") as f:  # one case a line: small, and diffs stay readable
        head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, ensure_ascii=False)[:-1]
        lines = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in doc["cases"]]
        f.write(head + ', "cases": [\n' + ",\n".join(lines) + "\n]}\n")
    print(f"{path}: {len(doc['cases'])} cases")
print(f"chunk counts cross-checked with the conlleval 0.2 port on {CROSS_CHECKED[0]} cases"
      if CROSS_CHECKED[0] else "conlleval 0.2 port not installed: no cross-check")
