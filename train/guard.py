"""Loss spikes and non-finite steps: skip the update, and roll back after too many (config `guard`).

Between the backward and the optimizer step, `SpikeGuard.admit(loss, norm)` decides whether this step's
update is applied. The decision is one all-reduce of (loss, grad norm), so every rank computes it from
the same two numbers and skips (or steps) together. An update is skipped when either number is not
finite, or, after `warmup` accepted steps, when its z-score against the last `window` accepted steps
exceeds `z_threshold` (llm.c's OutlierDetector: skip_update_lossz / skip_update_gradz). A skipped step
leaves the weights and the optimizer state untouched; its data is consumed.

`rollback_skips` skips within `rollback_within` steps roll the run back (PaLM, Chowdhery et al. 2022,
section 5.1: restart from a checkpoint before the spike and skip the batches that led to it):
`roll_back` reloads the newest checkpoint from before the first of those skips and keeps the loader where
it is, so the data windows between the checkpoint and now are never trained on. After `max_rollbacks`
rollbacks the next one stops the run instead (a TrainError: one line, exit code 2): a run that keeps
diverging needs a person. `state_dict()` (saved in the TrainState) holds the window, the
recent skips and every rollback, so that a run that skipped or rolled back resumes exactly.

Fault injection, for the tests only: with GPTRAIN_SPIKE=KIND@STEP[,STEP...][:RANK] in the environment,
`inject()` corrupts this rank's gradients (KIND nan: NaN; KIND scale: x1e4) after the backward of the
step that draws the data of global data step STEP (counted over every batch drawn, skipped ones too,
so that data skipped by a rollback is not corrupted again). RANK: only that rank (default: every rank).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn as nn

from train.checkpoint import step_of
from train.config import GuardSection
from train.errors import TrainError

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

    # ------------------------------------------------------------------ what the loop calls after a skip
    def report_skip(self, step: int, metrics, log) -> None:
        """Log the last verdict (a skipped update at training step `step`) to metrics.jsonl and the console."""
        v = self.last
        metrics.write(
            {
                "step": step,
                "skipped": v.reason,
                "skip_loss": v.loss,
                "skip_grad_norm": v.norm,
                "z_loss": v.z_loss,
                "z_norm": v.z_norm,
                "skips": self.skips,
            }
        )
        log(
            f"step {step}: update skipped ({v.reason}) | loss {v.loss:.4g} | grad norm {v.norm:.4g} | "
            f"z loss {v.z_loss:.2f} | z norm {v.z_norm:.2f} | {self.skips} skipped so far"
        )

    def roll_back(self, state, ckpts, loader, metrics, log) -> None:
        """Reload the newest checkpoint from before the first recent skip into `state` (the loop's
        TrainState, in place) through `ckpts` (a CheckpointManager: model, optimizer, this rank's RNG),
        and keep `loader` where it is, so that the data in between is skipped (PaLM, section 5.1).
        Raises TrainError when there is no checkpoint, or when guard.max_rollbacks are spent."""
        at, first_skip = state.step, min(self.recent_skips)
        ckpts.wait(all_ranks=True)  # an asynchronous save in flight is a candidate too
        earlier = sorted(
            (p for p in ckpts.root.glob("step_*") if p.is_dir() and (step_of(p) or 0) < first_skip), key=step_of
        )
        ckpt = earlier[-1] if earlier else ckpts.latest()
        if ckpt is None:
            raise TrainError(
                f"guard: {len(self.recent_skips)} skipped updates within {self.cfg.rollback_within} "
                f"steps at step {at} call for a rollback, but the run has no checkpoint to go back to: set "
                "checkpoint.every, or guard.rollback_skips=0 to keep skipping"
            )
        if 0 < self.cfg.max_rollbacks <= len(self.rollbacks):
            metrics.write({"step": at, "stopped": "guard.max_rollbacks", "rollbacks": len(self.rollbacks)})
            raise TrainError(
                f"guard: step {at} calls for rollback {len(self.rollbacks) + 1}, over guard.max_rollbacks="
                f"{self.cfg.max_rollbacks}: the run keeps diverging, stopping. The last good checkpoint is {ckpt}; "
                "lower optim.lr or raise schedule.warmup_steps and resume, or raise guard.max_rollbacks"
            )
        now = loader.state_dict()
        loaded = ckpts.load(ckpt)
        for f in dataclasses.fields(loaded):  # in place: the loop holds this TrainState
            setattr(state, f.name, getattr(loaded, f.name))
        self.load_state_dict(state.guard, history=False)
        record = self.rolled_back(at, state.step, state.loader, now)
        metrics.write({"step": at, "rollback": record})
        w0, w1 = record["windows"]
        log(
            f"step {at}: rolled back to {ckpt.name} (step {state.step}); skipping the data windows "
            f"[{w0}, {w1}) of epoch {record['epoch']} (the batches of steps {state.step + 1}-{at})"
        )

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
