"""Loss spikes and non-finite steps: skip the update, and roll back after too many (config `guard`).

Between the backward and the optimizer step, `SpikeGuard.admit(loss, norm)` decides whether this step's
update is applied. The decision is one all-reduce of (loss, grad norm), so every rank computes it from
the same two numbers and skips (or steps) together. An update is skipped when either number is not
finite, or, after `warmup` accepted steps, when its z-score against the last `window` accepted steps
exceeds `z_threshold` (llm.c's OutlierDetector: skip_update_lossz / skip_update_gradz). A skipped step
leaves the weights and the optimizer state untouched; its data is consumed.

`rollback_skips` skips within `rollback_within` steps roll the run back (PaLM, Chowdhery et al. 2022,
section 5.1: restart from a checkpoint before the spike and skip the batches that led to it): the loop
reloads the latest checkpoint and keeps the loader where it is, so the data windows between the
checkpoint and now are never trained on. `state_dict()` (saved in the TrainState) holds the window, the
recent skips and every rollback, so that a run that skipped or rolled back resumes exactly.

Fault injection, for the tests only: with GPTRAIN_SPIKE=KIND@STEP[,STEP...][:RANK] in the environment,
`inject()` corrupts this rank's gradients (KIND nan: NaN; KIND scale: x1e4) after the backward of the
step that draws the data of global data step STEP (counted over every batch drawn, skipped ones too,
so that data skipped by a rollback is not corrupted again). RANK: only that rank (default: every rank).
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn as nn

from train.config import GuardSection

SPIKE_ENV = "GPTRAIN_SPIKE"


@dataclass
class Verdict:
    """One step's decision: skipped or not, why, and the numbers it was made on (the same on every rank)."""

    skip: bool
    loss: float
    norm: float
    z_loss: float = 0.0
    z_norm: float = 0.0
    reason: str = ""


class SpikeGuard:
    def __init__(self, cfg: GuardSection):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)  # accepted steps' global mean losses
        self.norms: deque[float] = deque(maxlen=cfg.window)  # and their grad norms
        self.recent_skips: list[int] = []  # steps skipped within the rollback window
        self.skips = 0  # skipped steps over the whole run
        self.data_steps_skipped = 0  # steps' worth of data that rollbacks skipped
        self.rollbacks: list[dict] = []  # {"at_step", "to_step", "epoch", "windows": [start, end)}
        self.last: Verdict | None = None

    # ------------------------------------------------------------------ the decision
    def admit(self, strategy, step: int, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """True when step `step`'s update should be applied. Every rank calls it (one all-reduce)."""
        pair = torch.stack([loss.detach().float().reshape(()), norm.detach().float().reshape(())])  # (2,)
        pair = strategy.all_reduce_sum(pair) / strategy.world_size
        loss_v, norm_v = (float(v) for v in pair.tolist())
        v = Verdict(False, loss_v, norm_v)
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
            v.skip, v.reason = True, "non-finite"
        elif self.cfg.z_threshold > 0 and len(self.losses) >= max(self.cfg.warmup, 2):
            v.z_loss, v.z_norm = _z(loss_v, self.losses), _z(norm_v, self.norms)
            if max(v.z_loss, v.z_norm) > self.cfg.z_threshold:
                v.skip, v.reason = True, "outlier"
        if v.skip:
            self.skips += 1
            self.recent_skips = [s for s in self.recent_skips if s > step - self.cfg.rollback_within] + [step]
        else:
            self.losses.append(loss_v)
            self.norms.append(norm_v)
        self.last = v
        return not v.skip

    def wants_rollback(self) -> bool:
        return self.cfg.rollback_skips > 0 and len(self.recent_skips) >= self.cfg.rollback_skips

    def rolled_back(self, at_step: int, to_step: int, before: dict, after: dict) -> dict:
        """Record a rollback from at_step to a checkpoint of to_step; `before` / `after`: the loader's
        state at the checkpoint and now (the windows in between are skipped). Returns the record."""
        record = {
            "at_step": at_step,
            "to_step": to_step,
            "epoch": int(after.get("epoch", 0)),
            "windows": [int(before.get("windows_consumed", 0)), int(after.get("windows_consumed", 0))],
        }
        self.rollbacks.append(record)
        self.data_steps_skipped += at_step - to_step
        self.recent_skips = []
        return record

    def data_step(self, step: int) -> int:
        """The global data step the batch of training step `step` (1-based) comes from."""
        return step + self.data_steps_skipped

    # ------------------------------------------------------------------ exact resume
    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "norms": list(self.norms),
            "recent_skips": list(self.recent_skips),
            "skips": self.skips,
            "data_steps_skipped": self.data_steps_skipped,
            "rollbacks": [dict(r) for r in self.rollbacks],
        }

    def load_state_dict(self, sd: dict, *, history: bool = True) -> None:
        """Restore from a checkpoint's state; history=False keeps this run's skip count and rollbacks
        (a rollback reloads an older checkpoint but must not forget that it happened)."""
        if not sd:
            return
        self.losses = deque(sd["losses"], maxlen=self.cfg.window)
        self.norms = deque(sd["norms"], maxlen=self.cfg.window)
        if history:
            self.recent_skips = list(sd["recent_skips"])
            self.skips = int(sd["skips"])
            self.data_steps_skipped = int(sd["data_steps_skipped"])
            self.rollbacks = [dict(r) for r in sd["rollbacks"]]


def _z(x: float, window: deque[float]) -> float:
    """x's z-score against the window (population standard deviation); 0 for a constant window."""
    n = len(window)
    mean = sum(window) / n
    std = math.sqrt(sum((w - mean) ** 2 for w in window) / n)
    return (x - mean) / std if std > 0 else 0.0


def inject(model: nn.Module, rank: int, data_step: int) -> None:
    """The spike tests' hook (module docstring): corrupt this rank's gradients when asked to."""
    spec = os.environ.get(SPIKE_ENV)
    if not spec:
        return
    kind, _, rest = spec.partition("@")
    steps, _, only = rest.partition(":")
    if data_step not in {int(s) for s in steps.split(",")} or (only and int(only) != rank):
        return
    factor = float("nan") if kind == "nan" else 1e4
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
