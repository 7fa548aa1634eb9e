"""The strategy seam: everything the training loop needs from "how is this run parallelised".

The loop (train/loop.py) calls only the methods of `Strategy`; it never knows whether one
process, DDP, FSDP2 or DeepSpeed runs underneath -- the way torchtitan keeps parallelism
(parallelize.py) apart from the model and the loop. `SingleProcess` is the debug mode:
one process on CPU or one GPU. The distributed strategies live in train/strategies/.

Contract, in the order the loop uses it:
    s = make_strategy(cfg.parallel, device)      # process group is up after this
    model, opt = s.wrap(model, build_optimizer)  # build_optimizer(module) -> Optimizer
    for each step:
        for micro in range(accum):
            with s.sync_context(is_last=micro == accum - 1):
                loss = model(x, y)
                s.backward(loss)                 # scales by 1/accum itself
        norm = s.clip_and_step(max_norm)         # device tensor, no host sync
        s.zero_grad()
    s.save(ckpt_dir, extra_state, metadata)      # every rank calls; writes its part
    extra = s.load(ckpt_dir)                     # every rank calls; restores model+optimizer
    s.teardown()
"""

from __future__ import annotations

import contextlib
import gc
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from model.io import clean_state_dict, save_artifact

BuildOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
TRAIN_STATE = "train_state.pt"  # optimizer + loop state, loadable with weights_only=True


class Strategy(ABC):
    """One way of running the training step. Subclasses set rank, world_size, device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device
    grad_accum_steps: int = 1  # set by the loop before wrap() (DeepSpeed builds its config from it)
    # The loop's gradient clipping (clip_and_step's max_norm) and autocast precision
    # ("fp32" | "bf16" | "fp16"), set before wrap(): DeepSpeed bakes both into its config.
    grad_clip: float = 0.0
    precision: str = "fp32"
    # True when wrap() already applied torch.compile (per block, as torchtitan does); the loop
    # then must not compile the returned model again.
    compiles_model: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs, prints, writes metrics and shared files."""
        return self.rank == 0

    @abstractmethod
    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move / shard / wrap the model, then build the optimizer over the wrapped parameters
        (FSDP2 and DeepSpeed need the optimizer built after wrapping). Returns what the loop calls."""

    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward+backward: skips gradient sync unless is_last."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's mean loss, scaled so the accumulated gradient is the mean."""
        (loss / self.grad_accum_steps).backward()

    @abstractmethod
    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to max_norm (0 = no clipping) and step the optimizer; returns the
        pre-clip global grad norm as a device tensor (no host sync)."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def save(self, ckpt_dir: Path, extra_state: dict, metadata: dict) -> None:
        """Write model + optimizer + extra_state (plain python/tensors: step, loader, RNG, config)
        into ckpt_dir (already created, a temporary name the caller renames). Every rank calls.
        metadata goes into the model artifact (tokenizer spec, step, ...)."""

    @abstractmethod
    def load(self, ckpt_dir: Path) -> dict:
        """Restore model + optimizer from ckpt_dir (every rank calls); returns extra_state."""

    @abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full, unwrapped model state dict (on rank 0 at least; every rank must call)."""

    # ---- collectives the loop needs; trivial in one process --------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if any rank's flag is set (e.g. SIGTERM seen by one rank)."""
        return flag

    def barrier(self) -> None:  # noqa: B027 -- a no-op in one process, overridden by distributed strategies
        return None

    def teardown(self) -> None:
        """Release wrapped objects before the process group goes (see train/strategies/)."""
        gc.collect()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare GPT under torch.compile's OptimizedModule, DDP's and DeepSpeed's .module."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or _is_deepspeed_engine(model):
            model = model.module
        else:
            return model


def _is_deepspeed_engine(model: nn.Module) -> bool:
    # By class name, so that this module never imports deepspeed (an optional extra).
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


class SingleProcess(Strategy):
    """The debug mode: one process, CPU or one GPU, no process group."""

    scaler: torch.amp.GradScaler | None = None

    def __init__(self, device: torch.device, activation_checkpointing: bool = False, **_options):
        self.device = device  # the other parallel options (fsdp/deepspeed settings) mean nothing here
        self.activation_checkpointing = activation_checkpointing

    def wrap(self, model, build_optimizer):
        if self.activation_checkpointing:
            from train.ac import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        model = model.to(self.device)
        self.model, self.optimizer = model, build_optimizer(model)
        # fp16 autocast needs loss scaling (Micikevicius et al. 2018); fp32 and bf16 do not.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        return self.model, self.optimizer

    def backward(self, loss):
        loss = loss / self.grad_accum_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_and_step(self, max_norm):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        params = [p for p in self.model.parameters() if p.grad is not None]
        # clip_grad_norm_ with a huge bound still returns the norm, keeping one code path
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        return norm

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def model_state_dict(self):
        return clean_state_dict(unwrap(self.model).state_dict())

    def save(self, ckpt_dir, extra_state, metadata):
        bare = unwrap(self.model)
        save_artifact(Path(ckpt_dir) / "model", self.model_state_dict(), bare.config, metadata)
        state = {"optimizer": self.optimizer.state_dict(), "extra": extra_state}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, Path(ckpt_dir) / TRAIN_STATE)

    def load(self, ckpt_dir):
        from model.io import load_state

        _, sd, _ = load_state(Path(ckpt_dir))
        bare = unwrap(self.model)
        if bare.config.tie_embeddings:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        bare.load_state_dict(sd, strict=not bare.config.tie_embeddings)
        state = torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return state["extra"]

    def teardown(self):
        self.model = self.optimizer = None
        super().teardown()


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when run alone."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def make_strategy(name: str, device: torch.device, **options) -> Strategy:
    """The strategy named by `parallel.strategy` (none | ddp | fsdp | deepspeed).
    Distributed ones are imported lazily from train/strategies/ so that the debug mode needs
    neither a process group nor the deepspeed package."""
    if name == "none":
        return SingleProcess(device, **options)
    if name in ("ddp", "fsdp", "deepspeed"):
        import importlib

        mod = importlib.import_module(f"train.strategies.{name}")
        return mod.build(device, **options)
    raise ValueError(f"parallel.strategy must be one of none, ddp, fsdp, deepspeed; got {name!r}")
