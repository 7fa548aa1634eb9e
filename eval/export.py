"""python -m eval.export: a checkpoint to ONNX (fp32 / int8), torch.export (.pt2) or an int8 artifact.

    python -m eval.export --ckpt runs/debug --format onnx --out export/
    python -m eval.export --ckpt runs/debug --format onnx --int8 --data datasets/pydoc-bytes --out export/
    python -m eval.export --ckpt runs/debug --format pt2 --out export/
    python -m eval.export --ckpt runs/debug --format int8 --data datasets/pydoc-bytes --out runs/debug-int8

Every file is checked against the torch model before it is reported as written; a failed check
deletes it and exits non-zero. Files are written in a temporary directory beside OUT, flushed to
disk and renamed into OUT once checked.
  onnx   OUT/model.onnx (full sequence) and OUT/decoder.onnx (KV cache): onnxruntime logits within
         1e-3 of torch on random prompts. --int8 adds OUT/model.int8.onnx and OUT/decoder.int8.onnx
         (onnxruntime dynamic quantization), checked on --data's val split: the same argmax on >= 99%
         of positions and a val loss within 1% of the float model's.
  pt2    OUT/model.pt2, a torch.export ExportedProgram (dynamic batch and sequence), re-loaded and
         compared with the model (max abs diff <= 1e-4); the tokenizer spec rides in its extra files.
  int8   OUT is a model artifact (metadata quantization: int8) of the weight-only int8 model
         (model/quantize.py); with --data its val loss must be within 1% of the float model's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from eval.cli import UsageError, run
from model import GPT
from model.files import fsync_tree, recover

FORMATS = ("onnx", "pt2", "int8")
FP32_ATOL = 1e-3
PT2_ATOL = 1e-4
INT8_ARGMAX = 0.99
INT8_LOSS_REL = 0.01


class CheckFailed(UsageError):
    """An export that does not reproduce the model; its files have been deleted."""


@contextlib.contextmanager
def _staged(out: Path, names: list[str], force: bool) -> Iterator[Path]:
    """A temporary directory beside out for the files being written and checked. When the block ends
    without an error they are flushed to disk and moved into out, one rename each; otherwise they are
    deleted. The files move, not the directory: out may hold other exports (onnx and pt2 share one)."""
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        raise UsageError(f"{out} already holds {', '.join(existing)}; pass --force to replace, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)  # the staging directories that killed exports left beside out
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # the name recover() cleans
    try:
        yield tmp
        fsync_tree(tmp)
        out.mkdir(exist_ok=True)
        for n in names:
            os.replace(tmp / n, out / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def val_agreement(model: GPT, forward, batches) -> tuple[float, float, float]:
    """(fraction of val positions where argmax agrees, float loss, other loss) for forward vs model."""
    import torch.nn.functional as F

    agree = n = 0
    loss_ref = loss_got = 0.0
    for x, y in batches:
        ref = model(x)  # (B, T, V)
        got = forward(x)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += y.numel()
        loss_ref += F.cross_entropy(ref.flatten(0, 1).double(), y.flatten(), reduction="sum").item()
        loss_got += F.cross_entropy(got.flatten(0, 1).double(), y.flatten(), reduction="sum").item()
    if n == 0:
        raise UsageError("the check found no validation batches")
    return agree / n, loss_ref / n, loss_got / n


def check_batches(data: str, model: GPT, seq_len: int | None, batch_size: int, max_batches: int) -> list:
    from data.loader import val_batches

    T = min(seq_len or model.config.block_size, model.config.block_size)
    return list(
        val_batches(data, seq_len=T, batch_size=batch_size, max_batches=max_batches, vocab_size=model.config.vocab_size)
    )


def export_onnx(
    model: GPT, meta: dict, out: Path, int8: bool, batches: list | None, force: bool, log=print
) -> list[Path]:
    """Write, check and install the ONNX graphs; returns the installed files."""
    from eval.backends import OnnxBackend
    from model.onnx_export import check_parity, export_decoder, export_full, quantize_onnx

    names = ["model.onnx", "decoder.onnx"] + (["model.int8.onnx", "decoder.int8.onnx"] if int8 else [])
    with _staged(out, names, force) as tmp:
        export_full(model, tmp / "model.onnx", meta)
        export_decoder(model, tmp / "decoder.onnx", meta)
        diff = check_parity(model, tmp / "model.onnx", tmp / "decoder.onnx")
        if not diff <= FP32_ATOL:
            raise CheckFailed(f"onnxruntime logits differ from torch by {diff:.2e} > {FP32_ATOL}: export rejected")
        log(f"fp32 check: max |onnxruntime - torch| = {diff:.2e} (<= {FP32_ATOL})")
        if int8:
            for name in ("model", "decoder"):
                quantize_onnx(tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx")
                ort = OnnxBackend(tmp / f"{name}.int8.onnx")
                agree, ref, got = val_agreement(model, ort.forward, batches)
                rel = abs(got - ref) / ref
                msg = (
                    f"{name}.int8.onnx check: argmax agrees on {agree:.2%} of val positions (>= {INT8_ARGMAX:.0%}), "
                    f"val loss {got:.4f} vs {ref:.4f} ({rel:+.2%}, within {INT8_LOSS_REL:.0%})"
                )
                if agree < INT8_ARGMAX or rel > INT8_LOSS_REL:
                    raise CheckFailed(msg.replace(" check:", " check FAILED:") + "; export rejected")
                log(msg)
    return [out / n for n in names]


def export_pt2(model: GPT, meta: dict, out: Path, force: bool, log=print) -> list[Path]:
    from model.onnx_export import FullSequence

    with _staged(out, ["model.pt2"], force) as tmp:
        B = torch.export.Dim("batch", min=1, max=1024)
        T = torch.export.Dim("seq", min=1, max=model.config.block_size)
        x = torch.randint(0, model.config.vocab_size, (2, 5))
        with torch.no_grad():
            ep = torch.export.export(FullSequence(model), (x,), dynamic_shapes={"tokens": {0: B, 1: T}})
        extra = {"gptrain.json": json.dumps({"tokenizer": meta.get("tokenizer"), "config": model.config.to_dict()})}
        torch.export.save(ep, str(tmp / "model.pt2"), extra_files=extra)
        diff = check_pt2(model, tmp / "model.pt2")
        if not diff <= PT2_ATOL:
            raise CheckFailed(f"the re-loaded ExportedProgram differs from torch by {diff:.2e}: export rejected")
        log(f"pt2 check: re-loaded program, max |diff| = {diff:.2e} (<= {PT2_ATOL})")
    return [out / "model.pt2"]


@torch.no_grad()
def check_pt2(model: GPT, path: Path, seed: int = 0) -> float:
    ep = torch.export.load(str(path))
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for B, T in ((1, 3), (3, min(17, model.config.block_size))):
        x = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
        worst = max(worst, (ep.module()(x) - model(x)).abs().max().item())
    return worst


def export_int8(model: GPT, meta: dict, out: Path, batches: list | None, force: bool, log=print) -> list[Path]:
    import copy

    from model.quantize import linear_weight_bytes, quantize_model, save_quantized

    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it, or choose another --out")
    q = quantize_model(copy.deepcopy(model))
    ratio = linear_weight_bytes(model) / linear_weight_bytes(q)
    log(f"int8: Linear weights {ratio:.2f}x smaller (kernel {q.lm_head.kernel})")
    if batches is not None:
        agree, ref, got = val_agreement(model, q, batches)
        rel = abs(got - ref) / ref
        msg = f"int8 check: val loss {got:.4f} vs {ref:.4f} ({rel:+.2%}), argmax agrees on {agree:.2%}"
        if rel > INT8_LOSS_REL:
            raise CheckFailed(msg.replace("check:", "check FAILED:") + f" (> {INT8_LOSS_REL:.0%}); nothing written")
        log(msg)
    else:
        log("int8: no --data given, so the val-loss check was skipped")
    return [save_quantized(out, q, {k: v for k, v in meta.items() if k != "quantization"}, overwrite=force)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint or model artifact (float)")
    p.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--int8", action="store_true", help="onnx: also write onnxruntime int8 graphs")
    p.add_argument("--data", help="dataset for the int8 checks (its val split)")
    p.add_argument("--check-batches", type=int, default=8, help="val batches used by the int8 checks")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="check window (default: the model's context)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.format not in FORMATS:
        raise UsageError(f"unknown --format {args.format!r}; choose one of {', '.join(FORMATS)}")
    if args.int8 and args.format != "onnx":
        raise UsageError("--int8 goes with --format onnx (for a torch int8 artifact use --format int8)")
    if args.format == "onnx" and args.int8 and not args.data:
        raise UsageError("an int8 ONNX export is checked on validation data: pass --data DATASET_DIR")
    from model.io import load_model

    model, meta = load_model(args.ckpt)
    if meta.get("quantization"):
        raise UsageError(f"{args.ckpt} is already {meta['quantization']}; export from the float checkpoint")
    model = model.float().eval()
    out = Path(args.out)
    batches = None
    if args.data and (args.int8 or args.format == "int8"):
        batches = check_batches(args.data, model, args.seq_len, args.batch_size, args.check_batches)
    if args.format == "onnx":
        files = export_onnx(model, meta, out, args.int8, batches, args.force)
    elif args.format == "pt2":
        files = export_pt2(model, meta, out, args.force)
    else:
        files = export_int8(model, meta, out, batches, args.force)
    for f in files:
        size = f.stat().st_size if f.is_file() else sum(x.stat().st_size for x in f.rglob("*") if x.is_file())
        print(f"wrote {f} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(run(main))
