"""python -m eval.evaluate: loss, perplexity and bits per byte of a checkpoint on a dataset split.

    python -m eval.evaluate --ckpt runs/debug --data datasets/pydoc-bytes
    python -m eval.evaluate --ckpt runs/debug --data datasets/pydoc-bytes --backend int8 --max-batches 20
    python -m eval.evaluate --backend onnx --onnx export/model.onnx --data datasets/pydoc-bytes

Bits per byte = total loss in bits / bytes of the scored text, where the bytes are counted by
decoding each scored target token (special tokens such as <|endoftext|> count 0 bytes: they are no
text). Unlike per-token loss it does not depend on the tokenizer, so a byte-level model and a BPE
model can be compared (the measure of e.g. Gao et al. 2020, The Pile, sec. 5).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval.backends import BACKENDS, DTYPES, Backend, TorchBackend, load_backend
from eval.cli import UsageError, dtype_flag, run
from model.loss import loss_totals

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def token_bytes(enc) -> torch.Tensor:
    """(n_vocab,) int64: the UTF-8 bytes each token decodes to; 0 for special tokens."""
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    lengths = [0 if t in special else len(enc.decode_single_token_bytes(t)) for t in range(enc.n_vocab)]
    return torch.tensor(lengths, dtype=torch.long)


def split_batches(
    data_dir: str | Path, split: str, seq_len: int, batch_size: int, max_batches: int | None, vocab_size: int
) -> Batches:
    """Consecutive windows of a split in order. val is exactly training's val set (data.loader.val_batches)."""
    if split == "val":
        from data.loader import val_batches

        return val_batches(
            data_dir, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches, vocab_size=vocab_size
        )
    from data.shards import open_split

    stream = open_split(data_dir, split, vocab_size=vocab_size)
    n = (len(stream) - 1) // seq_len // batch_size
    if n == 0:
        raise UsageError(f"the {split} split of {data_dir} is shorter than one batch; lower --batch-size / --seq-len")
    n = n if max_batches is None else min(n, max_batches)

    def gen() -> Batches:
        for k in range(n):
            rows = [stream.read((k * batch_size + b) * seq_len, seq_len + 1) for b in range(batch_size)]
            w = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
            yield w[:, :-1], w[:, 1:]

    return gen()


def evaluate(backend: Backend, batches: Batches, byte_table: torch.Tensor) -> dict:
    """{"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} of the backend over the batches."""
    counted = {"bytes": 0}

    def tally(it: Batches) -> Batches:
        for x, y in it:
            counted["bytes"] += int(byte_table[y[y != -100]].sum())
            yield x, y

    if isinstance(backend, TorchBackend):  # training's own loss function (model/loss.py)
        total, count = loss_totals(backend.model, tally(batches))
        total, count = total.item(), count.item()
    else:
        total, count = 0.0, 0
        for x, y in tally(batches):
            logits = backend.forward(x)  # (B, T, V)
            total += F.cross_entropy(
                logits.flatten(0, 1).double(), y.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            count += int((y != -100).sum())
    if count == 0:
        raise UsageError("no batches to evaluate: the split is empty or shorter than one window")
    loss = total / count
    n_bytes = counted["bytes"]
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": int(count),
        "bytes": n_bytes,
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else float("nan"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--ckpt", help="run directory, checkpoint or model artifact (torch and int8 backends)")
    p.add_argument("--data", required=True, help="dataset directory written by python -m data.prepare")
    p.add_argument("--split", default="val", help="val (default) or train")
    p.add_argument("--backend", default="torch", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--onnx", help="an .onnx file written by eval.export (onnx backend)")
    p.add_argument("--dtype", default="fp32", help=f"torch backend precision: {' or '.join(DTYPES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from data.shards import read_meta
    from data.tokenizer import get_tokenizer

    for name in ("batch_size", "seq_len", "max_batches"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    backend = load_backend(args.backend, args.ckpt, args.onnx, dtype_flag(args.dtype), device=args.device)
    meta = read_meta(args.data)
    if backend.tokenizer and meta["tokenizer"] != backend.tokenizer:
        raise UsageError(
            f"{args.data} is tokenized with {meta['tokenizer']!r} but the model with "
            f"{backend.tokenizer!r}; evaluate on a dataset prepared with --tokenizer {backend.tokenizer}"
        )
    seq_len = args.seq_len or backend.block_size
    if seq_len > backend.block_size:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context of {backend.block_size}")
    enc = get_tokenizer(meta["tokenizer"], sha256=meta.get("tokenizer_sha256"))
    batches = split_batches(args.data, args.split, seq_len, args.batch_size, args.max_batches, backend.vocab_size)
    r = evaluate(backend, batches, token_bytes(enc))
    if args.json:
        print(json.dumps({**r, "backend": backend.name, "split": args.split}))
        return
    where = args.ckpt or args.onnx
    rows = [
        ("model", f"{where} ({backend.name})"),
        ("data", f"{args.data} [{args.split}], tokenizer {meta['tokenizer']}"),
        ("scored", f"{r['tokens']:,} tokens, {r['bytes']:,} bytes (windows of {seq_len})"),
        ("loss", f"{r['loss']:.4f} nats/token"),
        ("perplexity", f"{r['perplexity']:.3f}"),
        ("bits/byte", f"{r['bits_per_byte']:.4f}"),
    ]
    for k, v in rows:
        print(f"{k:<11} {v}")


if __name__ == "__main__":
    sys.exit(run(main))
