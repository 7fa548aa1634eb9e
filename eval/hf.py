"""python -m eval.hf: GPT-2 weights between Hugging Face directories and our model artifacts.

    python -m eval.hf import HF_DIR OUT     config.json + model.safetensors -> artifact (tokenizer gpt2)
    python -m eval.hf export CKPT OUT       a GPT-2-family checkpoint -> config.json + model.safetensors

The imported artifact is what eval.sample / evaluate / export read and what training starts from
(train.init_from). The exported directory loads with transformers.GPT2LMHeadModel.from_pretrained
and gives the same logits. The conversion itself is model/hf.py (Conv1D transposes, vocabulary padding).
Neither direction imports transformers; no network is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eval.cli import UsageError, run
from model import GPT
from model.hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_state_dict
from model.io import load_state, save_artifact


def read_hf_dir(hf_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, state dict) of a Hugging Face GPT-2 directory (one or several safetensors files)."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise UsageError(f"{d} is not a directory; pass a Hugging Face model directory "
                         "(config.json + model.safetensors)")
    if not (d / "config.json").is_file():
        raise UsageError(f"{d} has no config.json; it is not a Hugging Face model directory")
    try:
        hf_cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{d / 'config.json'} is not valid JSON ({e})") from None
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif index.is_file():  # sharded: model-00001-of-0000N.safetensors
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        bins = [p.name for p in d.glob("*.bin")]
        hint = (" (it has pickle .bin weights: re-save them with save_pretrained(..., safe_serialization=True))"
                if bins else "")
        raise UsageError(f"{d} has no model.safetensors{hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error types for truncated / foreign files
            raise UsageError(f"{f} cannot be read ({e})") from None
    return hf_cfg, sd


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, tokenizer: str = "gpt2",
              force: bool = False) -> Path:
    """A Hugging Face GPT-2 directory -> our model artifact (weights checked against the config)."""
    hf_cfg, hf_sd = read_hf_dir(hf_dir)
    cfg = config_from_hf(hf_cfg)
    sd = from_hf_state_dict(hf_sd, cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise UsageError(f"{hf_dir}: weights do not match its config.json (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    for k in expected:  # shapes, before anything is written
        if tuple(sd[k].shape) != tuple(model.state_dict()[k].shape):
            raise UsageError(f"{hf_dir}: {k} has shape {tuple(sd[k].shape)}, the config implies "
                             f"{tuple(model.state_dict()[k].shape)}")
    sd = {k: v.float() for k, v in sd.items()}
    return save_artifact(out, sd, cfg, {"tokenizer": tokenizer, "source": f"hf:{Path(hf_dir).name}"}, overwrite=force)


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Our GPT-2-family checkpoint -> a directory GPT2LMHeadModel.from_pretrained loads."""
    cfg, sd, meta = load_state(ckpt)
    if meta.get("quantization"):
        raise UsageError(f"{ckpt} is a {meta['quantization']} artifact; export the float checkpoint")
    try:
        hf_cfg = config_to_hf(cfg)
    except ValueError as e:
        raise UsageError(f"{ckpt}: {e}") from None
    from model.io import clean_state_dict

    hf_sd = to_hf_state_dict(clean_state_dict(sd), cfg)
    if cfg.tie_embeddings:  # safetensors stores no aliased tensors; from_pretrained re-ties the head
        hf_sd.pop("lm_head.weight", None)
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it, or choose another output")
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**hf_cfg, "torch_dtype": "float32"}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.hf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Hugging Face GPT-2 directory -> model artifact")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    imp.add_argument("--tokenizer", default="gpt2", help="tokenizer spec recorded in the artifact (default gpt2)")
    imp.add_argument("--force", action="store_true")
    exp = sub.add_parser("export", help="GPT-2-family checkpoint -> Hugging Face directory")
    exp.add_argument("ckpt")
    exp.add_argument("out")
    exp.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "import":
        path = import_hf(args.hf_dir, args.out, args.tokenizer, args.force)
    else:
        path = export_hf(args.ckpt, args.out, args.force)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(run(main))
