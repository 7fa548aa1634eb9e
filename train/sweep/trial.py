"""One sweep trial as a training run: the pruning callback, and the entry point of a trial that runs
under torchrun (`python -m train.sweep --nproc P`).

The worker (train/sweep/__main__.py) asks Optuna for a trial, writes the trial's config.yaml into its run dir
and, for P > 1, starts `torchrun -m train.sweep.trial RUN_DIR --storage URL --study NAME --trial-id ID`.
Rank 0 of that job re-attaches to the same trial through the storage, reports every evaluation to it
and asks the pruner; the loop's all-reduce (train/callbacks.py) makes every rank stop together. The
worker then reads the run's metrics.jsonl and tells Optuna the result: the trial is asked and told by
one process, and only its intermediate values come from the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model.cli import run
from train.callbacks import TrainPruned
from train.config import Config, load_config

OUTCOME = "sweep_outcome.json"  # RUN_DIR/sweep_outcome.json: what a torchrun trial ended as


class OptunaReport:
    """The loop's EvalCallback for a trial: report val loss at each evaluation, stop when pruned.
    Rank 0 alone talks to the storage; the other ranks answer False and follow rank 0's decision."""

    def __init__(self, trial, prune: bool):
        self.trial, self.prune = trial, prune
        self.is_main = int(os.environ.get("RANK", 0)) == 0

    def after_eval(self, step: int, val_loss: float) -> bool:
        if not self.is_main:
            return False
        self.trial.report(val_loss, step)
        return self.prune and self.trial.should_prune()


def train_trial(cfg: Config, trial, prune: bool, log) -> str:
    """Train one trial's config: 'complete', 'pruned' or 'stopped:SIGNAL' (SIGTERM / Ctrl-C)."""
    from train.loop import run

    try:
        result = run(cfg, log=log, callbacks=[OptunaReport(trial, prune)])
    except TrainPruned as e:
        log(f"pruned after the evaluation at step {e.step}")
        return "pruned"
    return "complete" if result["stopped"] == "done" else f"stopped:{result['stopped']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.sweep.trial", description="One sweep trial (under torchrun).")
    ap.add_argument("run_dir")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--trial-id", type=int, required=True)
    ap.add_argument("--options", required=True, help="the sweep's pruner options, JSON")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    is_main = int(os.environ.get("RANK", 0)) == 0
    cfg = load_config(run_dir / "config.yaml")
    trial, prune = None, False
    if is_main:
        import optuna

        from train.sweep.study import make_pruner, make_storage

        options = json.loads(args.options)
        study = optuna.load_study(
            study_name=args.study,
            storage=make_storage(args.storage),
            sampler=optuna.samplers.RandomSampler(),  # nothing is sampled here: the worker did that
            pruner=make_pruner(options),
        )
        trial, prune = optuna.trial.Trial(study, args.trial_id), options["pruner"] != "none"
    outcome = train_trial(cfg, trial, prune, print)
    if is_main:
        (run_dir / OUTCOME).write_text(json.dumps({"outcome": outcome}))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
