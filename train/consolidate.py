"""Write a checkpoint's model artifact (model/) from its DCP shards (any mesh layout), or the
strategy-neutral training state of any checkpoint.

    python -m train.consolidate RUN_DIR            # the run's latest checkpoint
    python -m train.consolidate RUN_DIR/checkpoints/step_000500 [--out DIR] [--overwrite]
    python -m train.consolidate CKPT --neutral OUT  # weights + optimizer state by parameter name

--neutral writes train/portable.py's form (docs/checkpoints.md: neutral.json + two safetensors files)
from a checkpoint of any strategy, world size or ZeRO stage, for moving a run to another codebase.

A layout that shards parameters (FSDP, HSDP, tp) writes model/ at the best and final checkpoints only
(gathering full weights costs a collective and rank 0's memory); this fills it in for any other, so
that eval/ can open it. One process, no process group: torch.distributed.checkpoint reads every
rank's shard of the model (not the optimizer) from the checkpoint's state/. The default output is
<checkpoint>/model, where eval/ looks.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from model.config import ModelConfig
from model.errors import UserError
from model.files import atomic_dir
from model.gpt import GPT
from model.io import MODEL_DIR, ArtifactError, latest_checkpoint, save_artifact
from train.checkpoint import STATE_DIR, TRAIN_STATE, TrainState
from train.portable import from_checkpoint


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint a path names: itself, or a run directory's latest."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise ArtifactError(f"run directory {p} has no complete checkpoint yet (no checkpoints/latest)")
        return ckpt
    if not (p / TRAIN_STATE).is_file():
        raise ArtifactError(
            f"{p} is not a training checkpoint (no {TRAIN_STATE}); pass RUN_DIR or RUN/checkpoints/step_N"
        )
    return p


def consolidate(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """The artifact written from the DCP shards of the checkpoint that `path` (run dir or checkpoint) names."""
    ckpt = checkpoint_dir(path)
    default_out = out is None
    out = ckpt / MODEL_DIR if default_out else Path(out)
    if default_out and out.exists() and not overwrite:
        raise ArtifactError(f"{ckpt} already holds its model artifact ({out}): nothing to consolidate")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or --out elsewhere")
    state = TrainState.from_dict(torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True), ckpt)
    shards = ckpt / STATE_DIR
    if not (shards / ".metadata").is_file():
        raise ArtifactError(
            f"{ckpt} holds no sharded weights (written by parallel.strategy={state.strategy}, whose checkpoints "
            "always include model/); nothing to consolidate"
        )
    config = ModelConfig.from_dict(state.model_config)
    model = _read_shards(shards, config)
    return save_artifact(out, model, config, state.artifact_metadata, overwrite=overwrite)


def neutral(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """The strategy-neutral form (train/portable.py) of the checkpoint that `path` names, written to
    `out` (a directory, published by one rename). One process; DeepSpeed checkpoints need deepspeed."""
    ckpt = checkpoint_dir(path)
    state = TrainState.from_dict(torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True), ckpt)
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        from_checkpoint(ckpt, ckpt / STATE_DIR, state, tmp).save(tmp)
    return out


def _read_shards(shards: Path, config: ModelConfig) -> GPT:
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty gives each module its own tensor: tie again
        model.lm_head.weight = model.transformer.wte.weight
    model.init_weights()  # non-persistent buffers (RoPE tables)
    sd = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        # DCP warns that it loads "in a single process": that is the point here.
        warnings.filterwarnings("ignore", message=".*single process.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load({"model": sd}, checkpoint_id=str(shards))  # the model part only, not the optimizer
    try:
        model.load_weights(sd)
    except ValueError as e:
        raise ArtifactError(f"{shards}: {e}") from None
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory (step_N)")
    ap.add_argument("--out", default=None, help="artifact directory (default: <checkpoint>/model)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument(
        "--neutral",
        metavar="OUT",
        default=None,
        help="write the strategy-neutral training state (weights + optimizer state by parameter name) to OUT",
    )
    args = ap.parse_args(argv)
    try:
        if args.neutral is not None:
            out = neutral(args.path, args.neutral, args.overwrite)
        else:
            out = consolidate(args.path, args.out, args.overwrite)
    except (UserError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
