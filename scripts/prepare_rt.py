#!/usr/bin/env python3
"""Turn the VADER movie-review ground truth into an SST-2-style binary task.

Usage: prepare_rt.py GROUND_TRUTH_TXT OUT_DIR

Input: movieReviewSnippets_GroundTruth.txt from the vaderSentiment 3.3.2 source
archive (additional_resources/hutto_ICWSM_2014.tar.gz): one snippet per line,
tab-separated `id`, `mean human score (-4..+4)`, `text`; UTF-8, CRLF line ends.

Output (in OUT_DIR): train.tsv and dev.tsv with the header `sentence<TAB>label`
(label 0 = negative score, 1 = positive score; score 0 is dropped), shuffled with
a fixed seed (0); dev holds 1,000 examples, train the rest. Also README.txt.
"""
import os
import random
import sys

DEV_SIZE = 1000
SEED = 0


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: prepare_rt.py GROUND_TRUTH_TXT OUT_DIR")
    src, out = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        text = f.read().decode("utf-8")
    rows = []
    zero = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            sys.exit(f"{src}:{lineno}: expected 3 tab-separated columns, found {len(parts)}")
        try:
            score = float(parts[1])
        except ValueError:
            sys.exit(f"{src}:{lineno}: bad score {parts[1]!r}")
        sentence = " ".join("\t".join(parts[2:]).split())  # strips tabs, CR/LF, runs of spaces
        if not sentence:
            continue
        if score == 0:
            zero += 1
            continue
        rows.append((sentence, 1 if score > 0 else 0))
    if len(rows) <= DEV_SIZE:
        sys.exit(f"{src}: only {len(rows)} usable rows")
    random.Random(SEED).shuffle(rows)
    dev, train = rows[:DEV_SIZE], rows[DEV_SIZE:]
    os.makedirs(out, exist_ok=True)
    for name, part in (("train.tsv", train), ("dev.tsv", dev)):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("sentence\tlabel\n")
            for sentence, label in part:
                f.write(f"{sentence}\t{label}\n")
        os.replace(tmp, os.path.join(out, name))
    with open(os.path.join(out, "README.txt"), "w", encoding="utf-8") as f:
        f.write(
            "rt-polarity: binary sentiment of Rotten Tomatoes movie-review snippets\n"
            "\n"
            "Source: movieReviewSnippets_GroundTruth.txt (10,605 snippets with mean human\n"
            "sentiment scores from -4 to +4), from hutto_ICWSM_2014.tar.gz in the\n"
            "vaderSentiment 3.3.2 source distribution on PyPI\n"
            "(C.J. Hutto and E. Gilbert, VADER, ICWSM 2014;\n"
            "https://github.com/cjhutto/vaderSentiment). Licence: MIT,\n"
            "Copyright (c) 2016 C.J. Hutto.\n"
            "\n"
            "Preparation (scripts/prepare_rt.py in beft): label 1 if the score is > 0,\n"
            "0 if < 0; snippets scored exactly 0 are dropped; whitespace (tabs, newlines)\n"
            "in the text collapsed to single spaces; shuffled with Python's\n"
            f"random.Random({SEED}); the first {DEV_SIZE} go to dev.tsv, the rest to train.tsv.\n"
            "Format: SST-2 style TSV, header `sentence<TAB>label`.\n"
            "\n"
            f"train.tsv: {len(train)} rows ({sum(l for _, l in train)} positive)\n"
            f"dev.tsv:   {len(dev)} rows ({sum(l for _, l in dev)} positive)\n"
            f"dropped (score 0): {zero}\n"
        )
    print(f"rt-polarity: {len(train)} train, {len(dev)} dev "
          f"({len(rows)} labelled, {zero} with score 0 dropped) -> {out}")


if __name__ == "__main__":
    main()
