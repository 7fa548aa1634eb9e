"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced (averaged)
in buckets during backward (https://pytorch.org/docs/stable/notes/ddp.html).

Checkpoints have the single-process format (rank 0 writes model/ + train_state.pt), because
after every step all ranks hold identical weights and optimizer state: a DDP checkpoint
resumes on any number of ranks, and under parallel.strategy=none.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from train.strategies.dist import DistributedStrategy, StrategyError, apply_block_transforms, check_options
from train.strategy import TRAIN_STATE, BuildOptimizer, SingleProcess


class DDPStrategy(DistributedStrategy, SingleProcess):
    """SingleProcess's step, clipping and file format; DDP's wrapper and process group."""

    name = "ddp"

    def __init__(self, device: torch.device | str, activation_checkpointing: bool = False, compile: bool = False):
        DistributedStrategy.__init__(self, device)
        self.activation_checkpointing, self.compile = activation_checkpointing, compile
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.model = self.optimizer = None

    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        apply_block_transforms(model, self.activation_checkpointing, compile_blocks=False)
        model = model.to(self.device)
        # DDP broadcasts rank 0's parameters and buffers at construction, so ranks start equal
        # even if their initialisations differed.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.model = self.ddp
        if self.compile:
            # Compile the DDP-wrapped module (PyTorch's documented order): dynamo's DDPOptimizer
            # splits the graph at bucket boundaries so that all-reduce still overlaps backward.
            self.model = torch.compile(self.ddp)
            self.compiles_model = True
        # The bare model: parameter names (weight-decay groups) and order match SingleProcess's.
        self.optimizer = build_optimizer(model)
        # float16 needs loss scaling; SingleProcess's backward / clip_and_step / save use the scaler.
        # Every rank sees the same all-reduced gradients, so they all skip the same steps.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        return self.model, self.optimizer

    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # No all-reduce on accumulation micro-steps: gradients accumulate locally and the last
        # micro-step's backward all-reduces the sum (DDP.no_sync).
        return contextlib.nullcontext() if is_last else self.ddp.no_sync()

    # backward, clip_and_step, zero_grad, model_state_dict: SingleProcess's. After the all-reduce
    # every rank holds the same averaged gradients, so the local norm is the global one.

    def save(self, ckpt_dir: Path, extra_state: dict, metadata: dict) -> None:
        if self.is_main:
            SingleProcess.save(self, ckpt_dir, extra_state, metadata)
        self.barrier()  # the caller renames the directory after save(): rank 0 must have finished

    def load(self, ckpt_dir: Path) -> dict:
        ckpt_dir = Path(ckpt_dir)
        for sub, other in (("dcp", "fsdp"), ("deepspeed", "deepspeed")):
            if (ckpt_dir / sub).is_dir():
                raise StrategyError(
                    f"{ckpt_dir} was written by parallel.strategy={other} (it has {sub}/); "
                    f"resume it with parallel.strategy={other}"
                )
        if not (ckpt_dir / "model").is_dir() or not (ckpt_dir / TRAIN_STATE).is_file():
            raise StrategyError(f"{ckpt_dir} is not a checkpoint: expected model/ and {TRAIN_STATE} in it")
        # Every rank reads the same files (a filesystem shared by all nodes), so all ranks resume
        # with identical weights and optimizer state, whatever world size wrote them.
        return SingleProcess.load(self, ckpt_dir)

    def _release(self) -> None:
        self.model = self.optimizer = self.ddp = None


def build(device: torch.device | str, **options) -> DDPStrategy:
    check_options("ddp", options)
    return DDPStrategy(
        device,
        activation_checkpointing=bool(options.get("activation_checkpointing") or False),
        compile=bool(options.get("compile") or False),
    )
