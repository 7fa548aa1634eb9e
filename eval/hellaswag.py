"""python -m eval.hellaswag: HellaSwag accuracy of a checkpoint, llm.c's way or lm-evaluation-harness's.

    python -m eval.hellaswag --ckpt runs/gpt2 --data hellaswag_val.jsonl
    python -m eval.hellaswag --ckpt runs/gpt2 --data hf:Rowan/hellaswag --style harness --limit 1000
    torchrun --nproc_per_node=8 -m eval.hellaswag --ckpt runs/gpt2 --data hellaswag_val.jsonl --device cuda

Prints acc and acc_norm with the number of examples; --out writes one JSON line per example (index,
label, pred, pred_norm, the four losses and token counts, truncated). Under torchrun every rank scores
every world_size-th example and the counts are summed. --style is explained in data/hellaswag.py and in
docs/evaluation.md, with the reference figures of GPT-2 124M.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data.hellaswag import HF_NAME, HF_PREFIX, STYLES, load_examples
from eval.backends import DTYPES, load_backend
from eval.cli import UsageError, run
from eval.hellaswag_score import Counts, hellaswag_eval
from model.files import write_text_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.hellaswag",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint or model artifact")
    p.add_argument(
        "--data",
        default=HF_PREFIX + HF_NAME,
        help=f"a rowanz/hellaswag JSONL file, or hf:NAME for a Hugging Face copy (default {HF_PREFIX}{HF_NAME})",
    )
    p.add_argument("--split", default="validation", help="split of an hf: dataset (default validation)")
    p.add_argument("--limit", type=int, default=None, help="the first N examples only")
    p.add_argument("--style", default="llmc", choices=STYLES, help="llmc (default) or harness")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (4 rows each)")
    p.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun: cuda = this rank's GPU)")
    p.add_argument("--out", default=None, help="write per-example predictions here (JSONL)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text line")
    return p.parse_args(argv)


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world_size, device) under torchrun (one process group for the run), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory; pass a file path for the predictions (JSONL)")
    if args.out and not Path(args.out).parent.is_dir():
        raise UsageError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
    rank, world, device = init_distributed(args.device)
    try:
        evaluate(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def evaluate(args: argparse.Namespace, rank: int, world: int, device: str) -> None:
    from data.tokenizer import get_tokenizer

    examples = load_examples(args.data, args.split, args.limit)
    backend = load_backend("torch", args.ckpt, dtype=args.dtype, device=device)
    if not backend.tokenizer:
        raise UsageError(f"{args.ckpt} records no tokenizer in its metadata; HellaSwag needs the model's tokenizer")
    enc = get_tokenizer(backend.tokenizer)
    if enc.n_vocab > backend.vocab_size:
        raise UsageError(
            f"tokenizer {backend.tokenizer!r} has {enc.n_vocab} tokens but {args.ckpt} only {backend.vocab_size}"
        )
    records: list[dict] | None = [] if args.out else None
    counts = hellaswag_eval(
        backend.model,
        enc,
        examples,
        style=args.style,
        batch_size=args.batch_size,
        rank=rank,
        world_size=world,
        device=backend.device,
        block_size=backend.block_size,
        progress=rank == 0 and sys.stderr.isatty(),
        records=records,
    )
    if world > 1:
        total = torch.tensor(counts.to_list(), dtype=torch.long, device=backend.device)
        dist.all_reduce(total)
        counts = Counts.from_list(total.tolist())
        if records is not None:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(records, gathered, dst=0)
            records = [r for part in gathered for r in part] if rank == 0 else None
    if rank != 0:
        return
    if records is not None:
        records.sort(key=lambda r: r["index"])
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in records))
    result = {
        "style": args.style,
        "examples": counts.n,
        "acc": counts.acc,
        "acc_norm": counts.acc_norm,
        "truncated": counts.truncated,
    }
    if args.json:
        print(json.dumps(result))
        return
    c = counts
    print(f"hellaswag ({args.style} style) on {c.n} examples: acc {c.acc:.4f}  acc_norm {c.acc_norm:.4f}")
    if counts.truncated:
        print(
            f"{counts.truncated} examples were longer than the model's context of {backend.block_size} tokens "
            "and lost tokens from the left"
        )


if __name__ == "__main__":
    sys.exit(run(main))
