"""`python -m train.lightning --config configs/X.yaml [section.key=value ...]`: gptrain's model, data and
recipe trained by lightning.Trainer (train/lightning/fit.py has the config -> Trainer map). Several
processes: under torchrun, as `python -m train`. User errors (also a missing lightning) print one line
and exit 2 (model/cli.py).
"""

from __future__ import annotations

import argparse
import sys

from model.cli import run
from train.config import load_config
from train.errors import TrainError

INSTALL = 'PyTorch Lightning is not installed: pip install -e ".[lightning]"'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.lightning", description="Train a GPT with lightning.Trainer.")
    ap.add_argument("--config", required=True, help="a YAML run file, e.g. configs/debug.yaml")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")
    args = ap.parse_args(argv)
    try:
        import lightning  # noqa: F401
    except ImportError:
        raise TrainError(INSTALL) from None
    cfg = load_config(args.config, args.overrides)
    from train.lightning.fit import run as fit

    fit(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
