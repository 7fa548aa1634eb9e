"""FSDP2: `torch.distributed.fsdp.fully_shard` over a 1-D DeviceMesh, each transformer block and
then the root (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html; torchtitan's
parallelize). Parameters, gradients and optimizer state are DTensors sharded on dim 0.

Checkpoints: every rank writes its shard of model + optimizer with torch.distributed.checkpoint (DCP)
into the state directory it is handed, from get_state_dict's fully-qualified names, so DCP reshards
on load and a checkpoint written by N ranks resumes on M. The model artifact (model/) is written by
train/checkpoint.py from model_state_dict() (a full state dict gathered to rank 0) at the best and
final checkpoints; `python -m train.consolidate` writes it for any other from the DCP shards. A
checkpoint of another strategy arrives as the strategy-neutral form (train/portable.py): load_portable.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model.dtypes import torch_dtype
from train.strategies.dist import DistributedStrategy, StrategyError, broadcast_module_, check_options, parse_dtype
from train.strategy import BuildOptimizer, StrategySpec, parallelize, unwrap


class FSDPStrategy(DistributedStrategy):
    name = "fsdp"
    weights_in_state = True

    def __init__(
        self,
        device: torch.device | str,
        spec: StrategySpec,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = torch.float32,
    ):
        self.spec, self.param_dtype, self.reduce_dtype = spec, param_dtype, reduce_dtype
        self.mp_policy = self.mixed_precision()  # first: a precision error needs no process group
        super().__init__(device, spec)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        bare = unwrap(model)
        if not any(p.is_meta for p in bare.parameters()):
            # fully_shard keeps each rank's own values for its shard: start from rank 0's weights.
            bare.to(self.device)
            broadcast_module_(bare)
        parallelize(bare, self.spec)
        mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        mp_policy = self.mp_policy
        # Bottom-up: one all-gather / reduce-scatter group per block, then the root group holding
        # the embeddings, final norm and head. Shared parameters are managed once, so a tied
        # lm_head stays the same (sharded) tensor as wte.
        for block in bare.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
        fully_shard(bare, mesh=mesh, mp_policy=mp_policy)
        if any(p.is_meta for p in bare.parameters()):
            # A model built on the meta device (big models): materialise only the local shards,
            # then initialise them (DTensor random ops keep the init consistent across ranks).
            bare.to_empty(device=self.device)
            bare.init_weights()
        self.model = bare
        self.optimizer = build_optimizer(bare)  # over the sharded DTensor parameters
        return self.model, self.optimizer

    def mixed_precision(self) -> MixedPrecisionPolicy:
        """bf16 parameters for compute, fp32 gradient reduction (torchtitan's default policy); the
        sharded parameters and the optimizer state stay fp32. parallel.fsdp_param_dtype unset
        follows the loop's precision (train.dtype)."""
        precision = self.spec.precision
        param_dtype = self.param_dtype if self.param_dtype is not None else torch_dtype(precision)
        if param_dtype == torch.float32:
            param_dtype = None  # no cast at all
        if param_dtype == torch.float16 or precision == "fp16":
            # float16 needs loss scaling, which this strategy does not do (torchtitan neither).
            raise StrategyError(
                "parallel.strategy=fsdp runs in bfloat16 or float32: set train.dtype=bfloat16 "
                "(and parallel.fsdp_param_dtype to bfloat16 or null), or use parallel.strategy=ddp "
                "for float16 with loss scaling"
            )
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=self.reduce_dtype)

    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        # Gradient accumulation without communication: skip the reduce-scatter on non-last
        # micro-steps (unsharded gradients accumulate locally); FSDP2's equivalent of no_sync.
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.spec.grad_accum_steps).backward()

    def clip_and_step(self) -> torch.Tensor:
        max_norm = self.spec.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        # The norm over sharded DTensor gradients is a partial result; full_tensor() all-reduces
        # it into the global norm (torchtitan's dist_utils.clip_grad_norm_).
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, False, True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        # Collective: every rank all-gathers; only rank 0 keeps the full (CPU) tensors.
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_state(self, state_dir: Path) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(state_dir))
        return {}

    def load_state(self, state_dir: Path, saved: dict, weights: Path | None) -> None:
        # get_state_dict gives the current (sharded) layout; DCP reads into it, resharding from
        # whatever world size wrote the checkpoint (torchtitan's checkpoint.py does the same).
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(state_dir))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def resumes_natively(self, saved_strategy: str, saved: dict) -> bool:
        return saved_strategy == "fsdp"  # DCP reshards to any world size

    def load_portable(self, portable) -> None:
        # Every rank hands the full tensors; set_*_state_dict(full_state_dict=True) keeps each rank's
        # shard of them (distribute_tensor onto the mesh). A tied head is the token table's entry. The
        # GPT has no persistent buffers (RoPE tables are non-persistent): parameters are the state.
        canonical = {id(p): n for n, p in self.model.named_parameters()}  # a shared one's first name
        full = {n: portable.params[canonical[id(p)]] for n, p in self.model.named_parameters(remove_duplicate=False)}
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, full, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, portable.optimizer_state_dict(), options=options)

    def _release(self) -> None:
        self.model = self.optimizer = None


def build(device: torch.device | str, spec: StrategySpec, **options) -> FSDPStrategy:
    check_options("fsdp", options)
    return FSDPStrategy(
        device,
        spec,
        param_dtype=parse_dtype(options.get("fsdp_param_dtype"), "fsdp_param_dtype"),
        reduce_dtype=parse_dtype(options.get("fsdp_reduce_dtype", "fp32"), "fsdp_reduce_dtype"),
    )
