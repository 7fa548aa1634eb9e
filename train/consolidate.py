"""Write a plain model artifact (model.safetensors + model.json) from a sharded FSDP checkpoint.

    python -m train.consolidate RUN_DIR            # the run's latest checkpoint
    python -m train.consolidate RUN_DIR/checkpoints/step_000500 [--out DIR] [--overwrite]

One process, no process group: torch.distributed.checkpoint reads every rank's shard of the
model (not the optimizer) through model/io.py. The default output is <checkpoint>/model, where
eval/ looks first; DDP and DeepSpeed checkpoints already hold one.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from model.io import ArtifactError, load_state, resolve, save_artifact


def consolidate(path: str | Path, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """The artifact written from the DCP checkpoint that `path` (run dir or checkpoint) names."""
    ckpt = resolve(path)
    if not (ckpt / "dcp").is_dir():
        raise ArtifactError(f"{path} resolves to {ckpt}, already a plain model artifact: nothing to consolidate")
    out = Path(out) if out is not None else ckpt / "model"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or --out elsewhere")
    with warnings.catch_warnings():
        # DCP warns that it loads "in a single process": that is the point here.
        warnings.filterwarnings("ignore", message=".*single process.*")
        config, state_dict, metadata = load_state(ckpt)
    return save_artifact(out, state_dict, config, metadata, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory holding dcp/")
    ap.add_argument("--out", default=None, help="artifact directory (default: <checkpoint>/model)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    args = ap.parse_args(argv)
    try:
        out = consolidate(args.path, args.out, args.overwrite)
    except (ArtifactError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
