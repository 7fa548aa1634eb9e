"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced (averaged)
in buckets during backward (https://pytorch.org/docs/stable/notes/ddp.html).

After every step all ranks hold identical weights and optimizer state, so rank 0's model artifact
and optimizer state (in train_state.pt; state/ stays empty) are the whole checkpoint: it resumes on
any number of ranks, and under parallel.strategy=none.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from model.io import clean_state_dict
from train.strategies.dist import DistributedStrategy, check_options
from train.strategy import BuildOptimizer, LocalStep, StrategySpec, parallelize


class DDPStrategy(DistributedStrategy):
    """DDP's wrapper and process group; the step, clipping and fp16 scaling of LocalStep (after the
    all-reduce every rank holds the same averaged gradients, so the local norm is the global one and
    every rank's scaler skips the same steps)."""

    name = "ddp"

    def __init__(self, device: torch.device | str, spec: StrategySpec):
        super().__init__(device, spec)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.bare: nn.Module | None = None
        self.local: LocalStep | None = None

    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        self.bare = parallelize(model, self.spec).to(self.device)
        # DDP broadcasts rank 0's parameters and buffers at construction, so ranks start equal
        # even if their initialisations differed.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(self.bare, device_ids=device_ids)
        # The bare model: parameter names (weight-decay groups) and order match SingleProcess's.
        optimizer = build_optimizer(self.bare)
        self.local = LocalStep(self.bare, optimizer, self.spec, self.device)
        return self.ddp, optimizer

    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # No all-reduce on accumulation micro-steps: gradients accumulate locally and the last
        # micro-step's backward all-reduces the sum (DDP.no_sync).
        return contextlib.nullcontext() if is_last else self.ddp.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        self.local.backward(loss)

    def clip_and_step(self) -> torch.Tensor:
        return self.local.clip_and_step()

    def zero_grad(self) -> None:
        self.local.zero_grad()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return clean_state_dict(self.bare.state_dict()) if self.is_main else {}

    def save_state(self, state_dir: Path) -> dict:
        return self.local.state_dict() if self.is_main else {}

    def load_state(self, state_dir: Path, saved: dict, weights: Path | None) -> None:
        # Every rank reads the same files (a filesystem shared by all nodes), so all ranks resume
        # with identical weights and optimizer state, whatever world size wrote them.
        self.local.load_state_dict(saved, weights)

    def load_portable(self, portable) -> None:
        self.local.load_portable(portable)  # every rank: the same full state

    def _release(self) -> None:
        self.ddp = self.bare = self.local = None


def build(device: torch.device | str, spec: StrategySpec, **options) -> DDPStrategy:
    check_options("ddp", options)
    return DDPStrategy(device, spec)
