"""`python -m data.inspect DIR_OR_CONFIG`: what a run will read, per source, before it runs.

    python -m data.inspect datasets/pydoc-bytes --seq-len 256 --tokens-per-step 2048 --steps 700
    python -m data.inspect configs/mix-demo.yaml

Per source: train/val tokens, documents, shards, windows of seq_len, the windows a run of N steps draws
from it and the epochs that makes (for a mix: the exact draw, with its schedule and epochs caps), and a few
decoded windows from the start of the run's stream. A training config (YAML) supplies data.dir or data.mix
(+ mix_schedule), data.seq_len (or model.block_size), train.tokens_per_step, train.max_steps and
train.seed; flags override them, and must be given where the config has no value. The YAML is read here
(data/ does not import train/), for these keys only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from data.errors import DataError
from data.loader import BatchLoader
from data.mixture import MixSource, MixtureLoader, parse_mix
from data.shards import read_meta
from data.tokenizer import get_tokenizer
from model.cli import run


def plan_from_config(path: Path) -> dict:
    """The keys of a training config that decide what it reads (missing ones absent)."""
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read the config {path}: {e}") from None
    data, train, model = (doc.get(k) or {} for k in ("data", "train", "model"))
    plan = {
        "dir": data.get("dir"),
        "mix": data.get("mix") or [],
        "mix_schedule": data.get("mix_schedule") or [],
        "seq_len": data.get("seq_len") or model.get("block_size"),
        "tokens_per_step": train.get("tokens_per_step"),
        "steps": train.get("max_steps"),
        "seed": train.get("seed"),
    }
    return {k: v for k, v in plan.items() if v not in (None, [])}


def report(plan: dict, *, windows: int = 2, chars: int = 160) -> str:
    """The text `python -m data.inspect` prints for a plan (see plan_from_config)."""
    if plan.get("dir") and not plan.get("mix"):
        read_meta(plan["dir"])  # a missing dataset is the first thing to say
    missing = [k for k in ("seq_len", "tokens_per_step", "steps") if not plan.get(k)]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise DataError(f"give {flags} (or a training config that sets them) to size the run")
    T, steps, seed = plan["seq_len"], plan["steps"], plan.get("seed", 0)
    if plan.get("mix"):
        sources, phases = parse_mix(plan["mix"], plan.get("mix_schedule"))
        ld = MixtureLoader(
            sources, phases, seq_len=T, tokens_per_step=plan["tokens_per_step"], micro_batch=1, seed=seed
        )
        num_windows, tok_meta = ld.num_windows, ld.meta
    else:
        sources = [MixSource(str(plan["dir"]), 1.0, Path(str(plan["dir"])).name)]
        ld = BatchLoader(plan["dir"], seq_len=T, tokens_per_step=plan["tokens_per_step"], micro_batch=1, seed=seed)
        num_windows, tok_meta = [ld.num_windows], read_meta(plan["dir"])
    G = ld.windows_per_step
    enc = get_tokenizer(tok_meta["tokenizer"], sha256=tok_meta.get("tokenizer_sha256"))
    first_src, first_win = ld.take_windows(G)  # the (source, window) pairs of the run's first step
    if isinstance(ld, MixtureLoader):
        ld.chooser.replay(steps * G)
        drawn = ld.chooser.counts.tolist()
    else:
        drawn = [steps * G]
    lines = [
        f"run: {steps:,} steps x {plan['tokens_per_step']:,} tokens = {steps * G:,} windows of seq_len={T} "
        f"| tokenizer {tok_meta['tokenizer']} (vocab {tok_meta['vocab_size']})"
    ]
    for i, (s, W) in enumerate(zip(sources, num_windows, strict=True)):
        meta = read_meta(s.dir)
        n_shards = {sp: sum(x["split"] == sp for x in meta["shards"]) for sp in ("train", "val")}
        docs = f"{meta['documents']:,}" if meta.get("documents") is not None else "?"
        lines.append(
            f"\n[{s.name}] {s.dir}"
            + (f" | weight {s.weight:g}" if plan.get("mix") else "")
            + (f" | epochs_cap {s.epochs_cap:g}" if s.epochs_cap else "")
        )
        lines.append(
            f"  tokens: {meta['train_tokens']:,} train in {n_shards['train']} shards, {meta['val_tokens']:,} val in "
            f"{n_shards['val']} shards | documents {docs} | {W:,} train windows"
        )
        share = drawn[i] / max(1, steps * G)
        lines.append(f"  this run draws {drawn[i]:,} windows = {drawn[i] / W:.2f} epochs ({share:.1%} of the run)")
        stream = ld.streams[i] if isinstance(ld, MixtureLoader) else ld.stream
        for w in first_win[first_src == i][:windows].tolist():
            text = enc.decode(stream.read(w * T, T).tolist(), errors="replace")
            lines.append(f"  window {w}: {text[:chars]!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.inspect",
        description="Per source: tokens, documents, shards, the epochs a run takes, and decoded windows.",
    )
    parser.add_argument("target", help="a dataset directory (from data.prepare) or a training config (.yaml)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: the config's)")
    parser.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step (default: the config's)")
    parser.add_argument("--steps", type=int, help="steps of the run (default: the config's train.max_steps)")
    parser.add_argument("--seed", type=int, help="the run's seed (default: the config's train.seed, else 0)")
    parser.add_argument("--windows", type=int, default=2, help="decoded windows shown per source (default: 2)")
    args = parser.parse_args(argv)
    target = Path(args.target)
    if target.suffix in (".yaml", ".yml"):
        if not target.is_file():
            raise DataError(f"config {target} not found")
        plan = plan_from_config(target)
    else:
        plan = {"dir": str(target)}
    flags = {
        "seq_len": args.seq_len,
        "tokens_per_step": args.tokens_per_step,
        "steps": args.steps,
        "seed": args.seed,
    }
    plan.update({k: v for k, v in flags.items() if v is not None})
    if not plan.get("dir") and not plan.get("mix"):
        raise DataError(f"{target} names no data (data.dir or data.mix)")
    print(report(plan, windows=args.windows))


if __name__ == "__main__":
    sys.exit(run(main, prog="data.inspect"))
