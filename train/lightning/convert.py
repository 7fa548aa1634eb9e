"""`python -m train.lightning.convert CKPT --out DIR`: a Lightning checkpoint -> gptrain's model artifact.

CKPT is a .ckpt file of `python -m train.lightning`, or its run directory (then RUN/checkpoints/last.ckpt).
DIR then opens with eval.sample, eval.evaluate, eval.export, eval.hf, eval.serve. Needs no lightning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.cli import run
from train.lightning.artifact import LAST, to_artifact


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.lightning.convert", description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", help="a .ckpt file, or the run directory of `python -m train.lightning`")
    ap.add_argument("--out", required=True, help="the artifact directory to write")
    args = ap.parse_args(argv)
    path = Path(args.ckpt)
    if path.is_dir() and (path / LAST).is_file():
        path = path / LAST
    out = to_artifact(path, args.out)
    print(f"wrote {out} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
