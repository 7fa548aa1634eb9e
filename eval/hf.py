"""python -m eval.hf: weights between Hugging Face directories and our model artifacts.

    python -m eval.hf import HF_DIR OUT     config.json + model.safetensors (or shards + index) -> artifact
    python -m eval.hf export CKPT OUT       a checkpoint -> config.json + model.safetensors
                                            (+ vocab.json, merges.txt, tokenizer_config.json)

GPT-2 family <-> GPT2LMHeadModel; modern family (RoPE, RMSNorm, SwiGLU, GQA) <-> LlamaForCausalLM, whose
export also writes generation_config.json; with mixture-of-experts blocks <-> MixtralForCausalLM (or
Qwen3MoeForCausalLM with QK-norm), refusing by name what those classes cannot express (model/hf_moe.py).
Llama features the modern family lacks (RoPE scaling, attention / MLP biases, sliding windows, a head_dim
other than hidden_size / heads) are refused by name.

The imported artifact is what eval.sample / evaluate / export read and what training starts from
(train.init_from). The exported directory loads with transformers' GPT2LMHeadModel / LlamaForCausalLM
from_pretrained and gives the same logits. The conversion itself is model/hf.py (Conv1D transposes, vocabulary padding).
When the checkpoint's tokenizer is a byte-level BPE with GPT-2's split pattern (gpt2, bytes), export
also writes it in GPT-2's Hugging Face files, so AutoTokenizer.from_pretrained(OUT) encodes as we do.
Neither direction imports transformers; no network is used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eval.cli import UsageError, run
from model import GPT
from model.files import atomic_dir
from model.hf import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    llama_config_from_hf,
    llama_config_to_hf,
    llama_from_hf_state_dict,
    llama_to_hf_state_dict,
    to_hf_state_dict,
)
from model.hf_moe import MOE_TYPES, moe_config_from_hf, moe_config_to_hf, moe_from_hf_state_dict, moe_to_hf_state_dict
from model.io import load_state, save_artifact


def read_hf_dir(hf_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, state dict) of a Hugging Face GPT-2 directory (one or several safetensors files)."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise UsageError(
            f"{d} is not a directory; pass a Hugging Face model directory (config.json + model.safetensors)"
        )
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
        try:
            files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise UsageError(f"{index} is not a safetensors index (no weight_map: {e!r})") from None
    else:
        bins = [p.name for p in d.glob("*.bin")]
        hint = (
            " (it has pickle .bin weights: re-save them with save_pretrained(..., safe_serialization=True))"
            if bins
            else ""
        )
        raise UsageError(f"{d} has no model.safetensors{hint}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors' own error types for truncated / foreign files
            raise UsageError(f"{f} cannot be read ({e})") from None
    return hf_cfg, sd


def import_hf(
    hf_dir: str | os.PathLike, out: str | os.PathLike, tokenizer: str | None = None, force: bool = False
) -> Path:
    """A Hugging Face GPT-2 or Llama directory -> our model artifact (weights checked against the config).
    tokenizer: the spec recorded in the artifact (a GPT-2 directory defaults to gpt2)."""
    if Path(out).exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it, or choose another output")
    hf_cfg, hf_sd = read_hf_dir(hf_dir)
    llama = hf_cfg.get("model_type") == "llama"
    moe = hf_cfg.get("model_type") in MOE_TYPES  # Mixtral, Qwen3-MoE (model/hf_moe.py)
    try:
        if moe:
            cfg = moe_config_from_hf(hf_cfg)
        elif llama:
            cfg = llama_config_from_hf(hf_cfg)
        else:
            cfg = config_from_hf(hf_cfg)
            tokenizer = tokenizer or "gpt2"
    except (ValueError, KeyError, TypeError) as e:  # ModelConfig's checks too; KeyError: a key it needs
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{hf_dir}/config.json does not convert: {e}") from None
    if moe:
        try:
            sd = moe_from_hf_state_dict(hf_sd, cfg)
        except ValueError as e:
            raise UsageError(f"{hf_dir}: {e}") from None
    else:
        sd = llama_from_hf_state_dict(hf_sd, cfg) if llama else from_hf_state_dict(hf_sd, cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise UsageError(
            f"{hf_dir}: weights do not match its config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for k in expected:  # shapes, before anything is written
        if tuple(sd[k].shape) != tuple(model.state_dict()[k].shape):
            raise UsageError(
                f"{hf_dir}: {k} has shape {tuple(sd[k].shape)}, the config implies {tuple(model.state_dict()[k].shape)}"
            )
    sd = {k: v.float() for k, v in sd.items()}
    meta = {"source": f"hf:{Path(hf_dir).name}"}
    if tokenizer:
        meta["tokenizer"] = tokenizer
    else:  # a Llama's SentencePiece / tokenizer.json has no tiktoken spec we can derive
        print("note: no tokenizer recorded; pass --tokenizer SPEC at import, or to eval.sample", file=sys.stderr)
    return save_artifact(out, sd, cfg, meta, overwrite=force)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of vocab.json and merges.txt (openai/gpt-2
    src/encoder.py): printable bytes stand for themselves, the others move to chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that reproduces byte-level BPE ranks: every multi-byte token, in rank order, split
    into the two parts that BPE with only lower ranks leaves it in (HF's TikTokenConverter does the same)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair, as tiktoken's encoder does
            pair_ranks = [ranks.get(a + b, rank) for a, b in itertools.pairwise(parts)]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) is not reachable by merging lower ranks")
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_hf_tokenizer(spec: str, vocab_size: int, block_size: int, out: Path) -> str | None:
    """vocab.json + merges.txt + tokenizer_config.json (GPT2Tokenizer) for the tokenizer `spec`, into out.
    Returns why nothing was written, or None. Only byte-level BPEs with GPT-2's split pattern and
    <|endoftext|> as their last id convert exactly; for any other tokenizer the weights go alone."""
    import tiktoken_ext.openai_public as openai_public

    from data.errors import DataError
    from data.tokenizer import ENDOFTEXT, get_tokenizer

    try:
        enc = get_tokenizer(spec)
    except DataError as e:
        return f"tokenizer {spec!r} cannot be loaded here ({str(e)[:120]}...)"
    if enc._pat_str != openai_public.r50k_pat_str or enc._special_tokens != {ENDOFTEXT: enc.n_vocab - 1}:
        return f"tokenizer {spec!r} is not GPT-2's byte-level BPE (split pattern or special tokens differ)"
    if enc.n_vocab != vocab_size:
        return f"tokenizer {spec!r} has {enc.n_vocab} tokens but the model's vocabulary is {vocab_size}"
    ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
    if sorted(ranks.values()) != list(range(enc.n_vocab - 1)) or any(bytes([b]) not in ranks for b in range(256)):
        return f"tokenizer {spec!r} does not hold all 256 bytes with dense ranks"
    to_chr = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_chr[x] for x in b)

    vocab = {text(b): r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[ENDOFTEXT] = enc.n_vocab - 1
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges = "".join(f"{text(a)} {text(b)}\n" for a, b in bpe_merges(ranks))
    (out / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": block_size,
        "add_prefix_space": False,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return None


def tokenizer_eot(spec: str | None) -> int | None:
    """The <|endoftext|> id of the tokenizer `spec` (the end-of-text token of an exported config), or None."""
    from data.errors import DataError
    from data.tokenizer import get_tokenizer

    if not spec:
        return None
    try:
        return get_tokenizer(spec).eot_token
    except DataError:
        return None


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Our checkpoint -> a directory transformers loads: GPT2LMHeadModel (GPT-2 family) or LlamaForCausalLM
    (modern family, with generation_config.json)."""
    cfg, sd, meta = load_state(ckpt)
    if meta.get("quantization"):
        raise UsageError(f"{ckpt} is a {meta['quantization']} artifact; export the float checkpoint")
    from model.io import clean_state_dict

    generation = None
    try:
        if cfg.n_experts:  # MixtralForCausalLM, or Qwen3MoeForCausalLM with QK-norm (model/hf_moe.py)
            eot = tokenizer_eot(meta.get("tokenizer"))
            hf_cfg = moe_config_to_hf(cfg, eot)
            hf_sd = moe_to_hf_state_dict(clean_state_dict(sd), cfg)
            generation = {"bos_token_id": eot, "eos_token_id": eot, "max_length": cfg.block_size}
        elif cfg.family == "modern":
            eot = tokenizer_eot(meta.get("tokenizer"))
            hf_cfg = llama_config_to_hf(cfg, eot)
            hf_sd = llama_to_hf_state_dict(clean_state_dict(sd), cfg)
            generation = {"bos_token_id": eot, "eos_token_id": eot, "max_length": cfg.block_size}
        else:
            hf_cfg = config_to_hf(cfg)
            hf_sd = to_hf_state_dict(clean_state_dict(sd), cfg)
    except ValueError as e:
        raise UsageError(f"{ckpt}: {e}") from None
    if cfg.tie_embeddings:  # safetensors stores no aliased tensors; from_pretrained re-ties the head
        hf_sd.pop("lm_head.weight", None)
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it, or choose another output")
    with atomic_dir(out, overwrite=force) as tmp:  # a crash leaves the old directory or the new one
        save_file(
            {k: v.contiguous() for k, v in hf_sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps({**hf_cfg, "torch_dtype": "float32"}, indent=2) + "\n")
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        why = write_hf_tokenizer(meta.get("tokenizer", ""), cfg.vocab_size, cfg.block_size, tmp)
        if why:
            print(f"note: no tokenizer files written: {why}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m eval.hf",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Hugging Face GPT-2 or Llama directory -> model artifact")
    imp.add_argument("hf_dir")
    imp.add_argument("out")
    imp.add_argument(
        "--tokenizer", help="tokenizer spec recorded in the artifact (default gpt2 for GPT-2, none for Llama)"
    )
    imp.add_argument("--force", action="store_true")
    exp = sub.add_parser("export", help="checkpoint -> Hugging Face directory (GPT2LMHeadModel or LlamaForCausalLM)")
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
