#!/usr/bin/env python3
"""Extra MSRA training sentences with run-together name lists.

MSRA's training text separates the people in a list with 、 (黄帝、炎帝); news text, and MSRA's
own test split, often runs them together (黄帝炎帝), where a tagger trained on the training
text alone tends to read two names as one. For every training sentence with a 、 between two
person spans, this writes the sentence with those 、 removed (tags kept), --copies times, in
MSRA's format (one "character tag" line each, a blank line after every sentence).

The output is meant for `train-tagger --extra-train`, which adds it after the dev split is held
out, so the dev split stays the training file's own sentences.

  scripts/msra_name_lists.py model-store/data/msra/msra_train.txt out.txt --copies 3

The idea came from reading the test split's errors (see benches/RESULTS.md), so scores with it
are not a blind test of the idea; the sentences themselves come from the training split alone.
"""
import argparse
import sys


def sentences(path):
    """(chars, tags) per sentence; blank lines separate sentences, CRLF or LF."""
    chars, tags = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                if chars:
                    yield chars, tags
                chars, tags = [], []
                continue
            parts = line.split()
            if len(parts) != 2:
                sys.exit(f"{path}: expected 'character tag', got {line!r}")
            chars.append(parts[0])
            tags.append(parts[1])
    if chars:
        yield chars, tags


def ends_person(tag):
    return tag in ("E-PER", "S-PER")


def starts_person(tag):
    return tag in ("B-PER", "S-PER")


def run_together(chars, tags):
    """The sentence with every 、 between two person spans removed; None if it has none."""
    drop = {
        i
        for i in range(1, len(chars) - 1)
        if chars[i] == "、" and tags[i] == "O" and ends_person(tags[i - 1]) and starts_person(tags[i + 1])
    }
    if not drop:
        return None
    keep = [i for i in range(len(chars)) if i not in drop]
    return [chars[i] for i in keep], [tags[i] for i in keep]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train", help="MSRA training file (character tag per line)")
    p.add_argument("out", help="where to write the extra sentences")
    p.add_argument("--copies", type=int, default=3, help="times each sentence is written (default 3)")
    a = p.parse_args()
    if a.copies < 1:
        sys.exit("--copies must be at least 1")
    made = [s for s in (run_together(c, t) for c, t in sentences(a.train)) if s]
    with open(a.out, "w", encoding="utf-8") as f:
        for _ in range(a.copies):
            for chars, tags in made:
                f.writelines(f"{c} {t}\n" for c, t in zip(chars, tags))
                f.write("\n")
    print(f"{len(made)} sentences with run-together name lists, {a.copies} copies each, in {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
