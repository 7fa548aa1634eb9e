"""`python -m train --config configs/X.yaml [section.key=value ...] [--profile]`

The same command runs one process or, under torchrun (or `bash launch.sh --nproc N ...`), every rank.
Errors a user can fix (model.errors.UserError) print one line and exit 2 (config) or 1 (anything
else), never a traceback; under torchrun rank 0 alone prints it (every rank raises the same one) and
every rank exits non-zero. A bug keeps its traceback. SIGTERM / Ctrl-C save a checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import os
import sys

from model.errors import UserError
from train.config import load_config
from train.errors import ConfigError

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
    is_main = int(os.environ.get("RANK", 0)) == 0

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        if is_main:
            print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.profile and cfg.logging.profile_steps == 0:
        cfg.logging.profile_steps = 5
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    from train.loop import run

    try:
        run(cfg)
    except UserError as e:
        # Set-up problems of one rank's environment (e.g. a missing GPU) are that rank's alone to tell.
        if is_main or getattr(e, "every_rank_reports", False):
            print(f"error{'' if is_main else ' on rank ' + os.environ.get('RANK', '?')}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1  # a layout the config asks for that cannot run
    except KeyboardInterrupt:
        print("interrupted (no checkpoint written for the current step)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
