"""The loop's one extension seam: objects that see every evaluation and may stop the run.

    run(cfg, callbacks=[MyCallback()])

After each periodic evaluation (step > 0) the Trainer calls `after_eval(step, val_loss)` on every
rank; when any callback on any rank returns True the run stops at once with TrainPruned (no checkpoint
of that step: a stopped trial is not continued). A hyperparameter sweep (train/sweep/__main__.py) reports the
value to its Optuna trial here and asks the pruner; train/ itself never imports optuna.
"""

from __future__ import annotations

from typing import Protocol

from train.errors import TrainError


class EvalCallback(Protocol):
    def after_eval(self, step: int, val_loss: float) -> bool:
        """True asks the loop to stop this run (e.g. an Optuna pruner's decision)."""
        ...


class TrainPruned(TrainError):
    """A callback stopped the run after an evaluation; `step` is that evaluation's."""

    def __init__(self, step: int):
        super().__init__(f"stopped by a callback (e.g. a sweep's pruner) after the evaluation at step {step}")
        self.step = step
