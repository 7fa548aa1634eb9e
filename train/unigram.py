"""`python -m train.unigram DATA_DIR [--run RUN_DIR]`: the loss of a unigram model of a dataset.

A model that knows every token's frequency in the train split and nothing else scores the val split at
the cross entropy printed here (add-one smoothed, so unseen tokens cost a finite amount). A language
model that has learned anything beyond letter/word frequencies must be well below it; the demo prints
both. (The train split's own unigram entropy is printed too: the same number up to the split's drift.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from model.cli import run


def unigram_losses(data_dir: str | Path) -> tuple[float, float]:
    """(entropy of the train unigram distribution, cross entropy of val under it), nats per token."""
    from data.shards import open_split, read_meta

    meta = read_meta(data_dir)
    vocab = meta["vocab_size"]
    train = open_split(data_dir, "train")
    counts = np.zeros(vocab, dtype=np.float64)
    block = 1 << 24  # count in blocks: a memmapped split is never read into RAM at once
    for start in range(0, len(train), block):
        counts += np.bincount(train.read(start, min(block, len(train) - start)), minlength=vocab)
    p_train = counts / counts.sum()
    nz = p_train > 0
    entropy = float(-(p_train[nz] * np.log(p_train[nz])).sum())
    smoothed = (counts + 1) / (counts.sum() + vocab)  # Laplace: no infinite loss on an unseen token
    val = open_split(data_dir, "val")
    val_counts = np.zeros(vocab, dtype=np.float64)
    for start in range(0, len(val), block):
        val_counts += np.bincount(val.read(start, min(block, len(val) - start)), minlength=vocab)
    cross = float(-(val_counts * np.log(smoothed)).sum() / val_counts.sum())
    return entropy, cross


def best_val(run_dir: Path) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [r["val_loss"] for r in map(json.loads, path.read_text().splitlines()) if "val_loss" in r]
    return min(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.unigram", description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", help="a directory written by python -m data.prepare")
    ap.add_argument("--run", type=Path, help="a run directory: compare its best val loss")
    args = ap.parse_args(argv)
    entropy, cross = unigram_losses(args.data_dir)
    print(
        f"unigram model of {args.data_dir}: val cross entropy {cross:.4f} nats/token "
        f"(train unigram entropy {entropy:.4f})"
    )
    if args.run is not None:
        best = best_val(args.run)
        if best is None:
            print(f"{args.run} has no val loss yet")
        else:
            print(f"{args.run}: best val loss {best:.4f} nats/token = {best / cross:.0%} of the unigram model's")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
