"""A sentence-pair regression task with 0-5 scores made from SST-2 (docs/quality.md, "Regression"), for checking
regression runs without the held-out STS-B: each example pairs two SST-2 sentences of at least 4 words (drawn
with a fixed seed) and scores it 2.5 x (number of positive sentences), i.e. 0, 2.5 or 5 -- STS-B's range and
a mean near its own (~2.7), so a new head that starts near 0 has the same distance to cover.

    python benchmarks/sst2_pair_regression.py $GLUE_DIR/SST-2 /tmp/sst2_pairs   # train.tsv (4000), dev.tsv (600)
    python launch/train.py --train_file /tmp/sst2_pairs/train.tsv --validation_file /tmp/sst2_pairs/dev.tsv ...

Training pairs come from SST-2 train, dev pairs from SST-2 dev (so no sentence is shared between them).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

MIN_WORDS = 4


def sentences(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines()[1:]:
        sentence, label = line.rsplit("\t", 1)
        if len(sentence.split()) >= MIN_WORDS:
            rows.append((sentence.strip(), int(label)))
    return rows


def pairs(rows: list[tuple[str, int]], count: int, seed: int) -> list[tuple[str, str, float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        (first, first_label), (second, second_label) = rng.sample(rows, 2)
        out.append((first, second, 2.5 * (first_label + second_label)))
    return out


def write(sst2_dir: Path, out_dir: Path, train_pairs: int = 4000, dev_pairs: int = 600) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", train_pairs, 0), ("dev", dev_pairs, 1)):
        rows = pairs(sentences(sst2_dir / f"{name}.tsv"), count, seed)
        (out_dir / f"{name}.tsv").write_text("sentence1\tsentence2\tlabel\n" + "".join(
            f"{a}\t{b}\t{score:.1f}\n" for a, b, score in rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sst2_dir", type=Path, help="GLUE SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train_pairs", type=int, default=4000)
    parser.add_argument("--dev_pairs", type=int, default=600)
    args = parser.parse_args(argv)
    write(args.sst2_dir, args.out_dir, args.train_pairs, args.dev_pairs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
