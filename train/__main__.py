"""`python -m train --config configs/X.yaml [section.key=value ...] [--profile]`

The same command runs one process or, under torchrun (or `bash launch.sh --nproc N ...`), every rank.
Errors a user can fix (model.errors.UserError) print one line and exit 2 (model/cli.py), never a traceback; under
torchrun rank 0 alone prints it (every rank raises the same one) and every rank exits non-zero.
A bug keeps its traceback. SIGTERM / Ctrl-C save a checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import sys

from model.cli import run
from train.config import load_config

EPILOG = """examples:
  python -m train --config configs/debug.yaml
  python -m train --config configs/debug.yaml train.max_steps=200 optim.lr=1e-3 train.run_dir=runs/try
  python -m train --config configs/debug.yaml train.resume=never        # start over in the same run dir
  python -m train --config configs/debug.yaml train.init_from=runs/debug train.run_dir=runs/finetune
  torchrun --standalone --nproc_per_node=8 -m train --config configs/gpt2-124m.yaml parallel.strategy=ddp
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a GPT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="a YAML run file, e.g. configs/debug.yaml")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="write a torch.profiler trace of 5 steps to RUN_DIR/profile (logging.profile_steps)",
    )
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.profile and cfg.logging.profile_steps == 0:
        cfg.logging.profile_steps = 5
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    from train.loop import run as train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, interrupted="interrupted (no checkpoint written for the current step)"))
