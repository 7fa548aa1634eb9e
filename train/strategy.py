"""The strategy seam: everything the training loop needs from "how is this run parallelised".

The loop (train/loop.py) calls only the methods of `Strategy`; it never knows which layout runs
underneath -- the way torchtitan keeps parallelism (parallelize.py) apart from the model and the loop.
Two engines implement it: the torch-native device mesh (train/parallel/mesh_strategy.py: one process,
DDP, FSDP2, HSDP, tensor / context / pipeline parallel, any composition) and DeepSpeed
(train/strategies/deepspeed.py).

Contract, in the order the loop uses it:
    spec = StrategySpec(precision="bf16", grad_accum_steps=4, grad_clip=1.0)   # frozen
    s = make_strategy(cfg.parallel.strategy, device, spec, **parallel_options) # train/parallel/build.py
    model, opt = s.wrap(model, build_optimizer)  # build_optimizer(module) -> Optimizer
    for each step:
        loss = s.forward_backward(micro_batches, amp)  # mean loss of this rank's micro-batches
        norm = s.clip_and_step()                 # clips to spec.grad_clip; device tensor, no host sync
                                                 # clip_and_step(gate): the torch-native layouts call
                                                 # gate(norm) before the optimizer step and skip it on
                                                 # False (train/guard.py); every rank calls the gate
        s.zero_grad()
    s.eval_model()                               # what evaluation and HellaSwag call: model(x[, y])
    saved = s.save_state(state_dir)              # every rank; whatever the strategy needs to resume
    s.load_state(state_dir, saved, weights)      # every rank; restores model + optimizer, when
                                                 # s.resumes_natively(saved_strategy, saved); else
    s.load_portable(portable)                    # every rank; from the strategy-neutral form
    s.teardown()
train/checkpoint.py owns the checkpoint layout and hands the strategy its directory (`state/`).
"""

from __future__ import annotations

import contextlib
import gc
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from model.dtypes import SHORT
from model.generation import CachedDecoder, Decoder

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
    # The dtype the blocks compute in where the layout casts the parameters for the forward (FSDP's
    # mixed precision); None: the parameters' own.
    compute_dtype: torch.dtype | None = None

    def __init__(self, device: torch.device, spec: StrategySpec):
        self.device, self.spec = torch.device(device), spec
        self.model: nn.Module | None = None  # what wrap() returned: the module the step calls

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (those that read different data)."""
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

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

    def forward_backward(
        self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], amp: contextlib.AbstractContextManager
    ) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches (each x, y: (micro_batch, seq_len) int64),
        accumulating the gradients of one optimizer step. Returns the mean loss over them as a device
        scalar (no host sync)."""
        n = len(micro_batches)
        loss_sum = None
        for i, (x, y) in enumerate(micro_batches):
            with self.sync_context(is_last=i == n - 1):  # DDP all-reduces only on the last micro-batch
                loss = self.micro_loss(x, y, amp)  # mean cross entropy of this micro-batch
                self.backward(loss)  # scales by 1/n: the accumulated gradient is the mean
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        return loss_sum / n

    def micro_loss(self, x: torch.Tensor, y: torch.Tensor, amp: contextlib.AbstractContextManager) -> torch.Tensor:
        """One micro-batch's forward: the mean loss."""
        with amp:
            return self.model(x, y)

    def eval_model(self) -> nn.Module:
        """The module evaluation and HellaSwag call as model(x) -> logits / model(x, y) -> mean loss,
        with plain (not distributed) tensors out."""
        return self.model

    def layout(self) -> dict:
        """What runs, for the startup log and metrics.jsonl: the strategy, the world size and (the
        mesh) each dimension's degree and this rank's coordinates."""
        return {"strategy": self.name, "world_size": self.world_size}

    def sample_decoder(self) -> Decoder:
        """What the training log's samples decode with (model/generation.py): here the bare model
        through its KV cache. Every rank decodes, in step (sharded parameters are gathered for each
        step, expert-parallel blocks send each rank's copy of the token through the ep group)."""
        return self.cached_decoder(unwrap(self.model))

    def cached_decoder(self, model: nn.Module) -> CachedDecoder:
        """`model` through its KV cache, as a model that goes on training is decoded: under no_grad, not
        inference mode (model.generation.CachedDecoder), the cache in the blocks' compute dtype."""
        return CachedDecoder(model, device=self.device, inference_mode=False, dtype=self.compute_dtype)

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

    def save_state_async(self, state_dir: Path, process_group) -> tuple[dict, Future | None]:
        """save_state, started: (what save_state returns, a Future that completes once state_dir is
        written, or None when it is written already). The state is copied before this returns, so that
        training may go on; cross-rank steps of the write run on `process_group` (a group of their own,
        or None in one process). By default the state is written before this returns."""
        return self.save_state(state_dir), None

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
    """The bare GPT under torch.compile's OptimizedModule and a wrapper's .module (DDP, an engine)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model
