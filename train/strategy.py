"""The strategy seam: everything the training loop needs from "how is this run parallelised".

The loop (train/loop.py) calls only the methods of `Strategy`; it never knows whether one
process, DDP, FSDP2 or DeepSpeed runs underneath -- the way torchtitan keeps parallelism
(parallelize.py) apart from the model and the loop. `SingleProcess` is the debug mode:
one process on CPU or one GPU. The distributed strategies live in train/strategies/.

Contract, in the order the loop uses it:
    spec = StrategySpec(precision="bf16", grad_accum_steps=4, grad_clip=1.0)   # frozen
    s = make_strategy(cfg.parallel.strategy, device, spec, **parallel_options) # process group is up
    model, opt = s.wrap(model, build_optimizer)  # build_optimizer(module) -> Optimizer
    for each step:
        for micro in range(spec.grad_accum_steps):
            with s.sync_context(is_last=micro == last):
                loss = model(x, y)
                s.backward(loss)                 # scales by 1/accum itself
        norm = s.clip_and_step()                 # clips to spec.grad_clip; device tensor, no host sync
        s.zero_grad()
    saved = s.save_state(state_dir)              # every rank; whatever the strategy needs to resume
    s.load_state(state_dir, saved, weights)      # every rank; restores model + optimizer, when
                                                 # s.resumes_natively(saved_strategy, saved); else
    s.load_portable(portable)                    # every rank; from the strategy-neutral form
    s.teardown()
train/checkpoint.py owns the checkpoint layout and hands the strategy its directory (`state/`).

`wrap` applies the model transforms in one place, `parallelize`, in torchtitan's order: activation
checkpointing, then torch.compile, then the strategy's sharding / wrapping. compile=True compiles each
transformer block in place (torchtitan's per-block compile, the same for every strategy): under none,
the blocks of the one model; under ddp, before DistributedDataParallel wraps it; under fsdp, before
fully_shard; under deepspeed, before deepspeed.initialize. Embeddings, final norm and head stay eager.
"""

from __future__ import annotations

import contextlib
import gc
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from model.dtypes import SHORT
from model.io import clean_state_dict
from train.config import STRATEGIES

BuildOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class StrategySpec:
    """What the loop decides and every strategy must honour; fixed before wrap() (DeepSpeed bakes
    precision, accumulation and clipping into its engine config)."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (model.dtypes short names)
    grad_accum_steps: int = 1
    grad_clip: float = 0.0  # global-norm clipping; 0 = off
    compile: bool = False  # torch.compile each transformer block (see the module docstring)
    activation_checkpointing: bool = False  # recompute each block's activations in backward

    def __post_init__(self) -> None:
        if self.precision not in SHORT.values():
            raise ValueError(f"StrategySpec.precision={self.precision!r}: use one of {', '.join(SHORT.values())}")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            raise ValueError(f"StrategySpec.grad_accum_steps={self.grad_accum_steps!r} must be a positive integer")
        if self.grad_clip < 0:
            raise ValueError(f"StrategySpec.grad_clip={self.grad_clip!r} must be >= 0 (0 = no clipping)")


def parallelize(model: nn.Module, spec: StrategySpec) -> nn.Module:
    """The model transforms, in place and in torchtitan's order: activation checkpointing, then
    torch.compile of each block; the strategy shards or wraps afterwards. Both keep parameter names,
    so checkpoints do not change: train/ac.py checkpoints inside each block's forward (no wrapper
    module), and nn.Module.compile() compiles a module in place (no `_orig_mod.` prefix)."""
    if spec.activation_checkpointing:
        from train.ac import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if spec.compile:
        for block in model.transformer.h:
            block.compile()
    return model


class Strategy(ABC):
    """One way of running the training step. Subclasses set rank, world_size, device in __init__."""

    name = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device
    # True when state/ holds the weights (sharded), so a checkpoint's model/ artifact is optional
    # (the loop writes it at best and final; train.consolidate fills it in for the others).
    weights_in_state: bool = False

    def __init__(self, device: torch.device, spec: StrategySpec):
        self.device, self.spec = torch.device(device), spec

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that logs, prints, writes metrics and shared files."""
        return self.rank == 0

    @abstractmethod
    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """parallelize(model, spec), then move / shard / wrap the model and build the optimizer over
        the wrapped parameters (FSDP2 and DeepSpeed need it built after wrapping)."""

    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward+backward: skips gradient sync unless is_last."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's mean loss, scaled so the accumulated gradient is the mean."""

    @abstractmethod
    def clip_and_step(self) -> torch.Tensor:
        """Clip gradients to spec.grad_clip (0 = no clipping) and step the optimizer; returns the
        pre-clip global grad norm as a device tensor (no host sync)."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full, bare model state dict on rank 0 (CPU tensors; empty elsewhere). Every rank calls."""

    @abstractmethod
    def save_state(self, state_dir: Path) -> dict:
        """Write what resuming needs beyond the model artifact into state_dir (created, empty; every
        rank calls). Returns rank 0's small weights_only-safe part for train_state.pt."""

    @abstractmethod
    def load_state(self, state_dir: Path, saved: dict, weights: Path | None) -> None:
        """Restore model + optimizer (every rank): from state_dir and `saved` (what save_state
        returned), and from the checkpoint's model artifact `weights` when the state holds no weights."""

    def resumes_natively(self, saved_strategy: str, saved: dict) -> bool:
        """Whether load_state (the fast path) reads a checkpoint that parallel.strategy=saved_strategy
        wrote (`saved`: what its save_state returned); otherwise train/checkpoint.py goes through the
        strategy-neutral form (train/portable.py) and load_portable. none and ddp write the same
        checkpoint (rank 0's artifact + optimizer), for any world size."""
        return saved_strategy in ("none", "ddp")

    @abstractmethod
    def load_portable(self, portable) -> None:
        """Restore model + optimizer (every rank) from a train.portable.Portable: full fp32 weights
        and the optimizer state, keyed by parameter name."""

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


class LocalStep:
    """backward / clip / optimizer step for gradients that are complete on this rank (one process, or
    DDP after its all-reduce): shared by SingleProcess and DDPStrategy by composition. fp16 autocast
    needs loss scaling (Micikevicius et al. 2018); fp32 and bf16 do not."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, spec: StrategySpec, device: torch.device):
        self.model, self.optimizer, self.spec = model, optimizer, spec
        self.scaler = torch.amp.GradScaler(device.type) if spec.precision == "fp16" else None

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.spec.grad_accum_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_and_step(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        params = [p for p in self.model.parameters() if p.grad is not None]
        # clip_grad_norm_ with an infinite bound still returns the norm: one code path
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Optimizer (+ scaler) state: small enough for train_state.pt, the same on every rank. The
        parameter names of each group (in the optimizer's order) name its index-keyed state, so that
        train/portable.py can read it without this process's objects."""
        names = {id(p): n for n, p in unwrap(self.model).named_parameters()}
        param_names = [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups]
        out = {"optimizer": self.optimizer.state_dict(), "param_names": param_names}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, saved: dict, weights: Path | None) -> None:
        from model.io import load_state
        from train.errors import TrainError

        _, sd, _ = load_state(weights)  # the checkpoint's model artifact: the weights are not in state/
        try:
            unwrap(self.model).load_weights(sd)
        except ValueError as e:
            raise TrainError(f"cannot resume from {weights}: {e}") from None
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as e:  # other parameter groups: another optim.name (or a changed split)
            raise TrainError(
                f"cannot resume from {weights.parent}: its optimizer state does not fit this optimizer ({e}); "
                "resume with the optim.name it was written with, or start from its weights with "
                f"train.init_from={weights}"
            ) from None
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])

    def load_portable(self, portable) -> None:
        """Weights and the name-keyed optimizer state (the fp16 loss scale starts afresh)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        bare = unwrap(self.model)
        bare.load_weights(portable.params)  # load_state_dict casts to the parameters' dtype
        set_optimizer_state_dict(
            bare, self.optimizer, portable.optimizer_state_dict(), options=StateDictOptions(full_state_dict=True)
        )


class SingleProcess(Strategy):
    """The debug mode: one process, CPU or one GPU, no process group."""

    name = "none"

    def __init__(self, device: torch.device, spec: StrategySpec, **_parallel_options):
        # the other parallel options (fsdp / deepspeed settings) mean nothing in one process
        super().__init__(device, spec)
        self.model = self.optimizer = self.local = None

    def wrap(self, model, build_optimizer):
        model = parallelize(model, self.spec).to(self.device)
        self.model, self.optimizer = model, build_optimizer(model)
        self.local = LocalStep(model, self.optimizer, self.spec, self.device)
        return self.model, self.optimizer

    def backward(self, loss):
        self.local.backward(loss)

    def clip_and_step(self):
        return self.local.clip_and_step()

    def zero_grad(self):
        self.local.zero_grad()

    def model_state_dict(self):
        return clean_state_dict(unwrap(self.model).state_dict())

    def save_state(self, state_dir):
        return self.local.state_dict()  # the weights are the checkpoint's model artifact

    def load_state(self, state_dir, saved, weights):
        self.local.load_state_dict(saved, weights)

    def load_portable(self, portable):
        self.local.load_portable(portable)

    def teardown(self):
        self.model = self.optimizer = self.local = None
        super().teardown()


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when run alone."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def make_strategy(name: str, device: torch.device, spec: StrategySpec | None = None, **parallel_options) -> Strategy:
    """The strategy named by `parallel.strategy` (none | ddp | fsdp | deepspeed), built from the frozen
    spec and the parallel section's options. Distributed ones are imported lazily from
    train/strategies/ so that the debug mode needs neither a process group nor the deepspeed package."""
    spec = spec if spec is not None else StrategySpec()
    if name == "none":
        return SingleProcess(device, spec, **parallel_options)
    if name in STRATEGIES:
        import importlib

        mod = importlib.import_module(f"train.strategies.{name}")
        return mod.build(device, spec, **parallel_options)
    raise ValueError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
