"""FSDP2: `torch.distributed.fsdp.fully_shard` over a 1-D DeviceMesh, each transformer block and
then the root (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html; torchtitan's
parallelize). Parameters, gradients and optimizer state are DTensors sharded on dim 0.

Checkpoints are sharded: every rank writes its own shard with torch.distributed.checkpoint (DCP)
into ckpt_dir/dcp, from get_state_dict's fully-qualified names, so DCP reshards on load and a
checkpoint written by N ranks resumes on M. Rank 0 also writes ckpt_dir/model.json (the
artifact's config + metadata, so model/io.py can read the weights in one process) and
ckpt_dir/train_state.pt (the loop's state, weights_only-loadable).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model.io import CONFIG, FORMAT
from train.strategies.dist import (
    DistributedStrategy,
    StrategyError,
    apply_block_transforms,
    broadcast_module_,
    check_options,
    parse_dtype,
    require_layout,
)
from train.strategy import TRAIN_STATE, BuildOptimizer, unwrap

DCP_DIR = "dcp"


class FSDPStrategy(DistributedStrategy):
    name = "fsdp"

    def __init__(
        self,
        device: torch.device | str,
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = torch.float32,
        activation_checkpointing: bool = False,
        compile: bool = False,
    ):
        super().__init__(device)
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.activation_checkpointing, self.compile = activation_checkpointing, compile
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        bare = unwrap(model)
        if not any(p.is_meta for p in bare.parameters()):
            # fully_shard keeps each rank's own values for its shard: start from rank 0's weights.
            bare.to(self.device)
            broadcast_module_(bare)
        apply_block_transforms(bare, self.activation_checkpointing, self.compile)
        self.compiles_model = self.compile
        mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        mp_policy = self.mixed_precision()
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
        param_dtype = self.param_dtype
        if param_dtype is None:
            param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if param_dtype == torch.float32:
            param_dtype = None  # no cast at all
        if param_dtype == torch.float16 or self.precision == "fp16":
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

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
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

    def save(self, ckpt_dir: Path, extra_state: dict, metadata: dict) -> None:
        ckpt_dir = Path(ckpt_dir)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir / DCP_DIR))
        if self.is_main:
            doc = {"format": FORMAT, "config": unwrap(self.model).config.to_dict(), "metadata": metadata or {}}
            (ckpt_dir / CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
            torch.save(
                {"extra": extra_state, "strategy": self.name, "world_size": self.world_size}, ckpt_dir / TRAIN_STATE
            )
        self.barrier()  # the caller renames the directory after save(): every file must be written

    def load(self, ckpt_dir: Path) -> dict:
        ckpt_dir = Path(ckpt_dir)
        require_layout(ckpt_dir, DCP_DIR, "fsdp")
        # get_state_dict gives the current (sharded) layout; DCP reads into it, resharding from
        # whatever world size wrote the checkpoint (torchtitan's checkpoint.py does the same).
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(ckpt_dir / DCP_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return torch.load(ckpt_dir / TRAIN_STATE, map_location="cpu", weights_only=True)["extra"]

    def _release(self) -> None:
        self.model = self.optimizer = None


def build(device: torch.device | str, **options) -> FSDPStrategy:
    check_options("fsdp", options)
    return FSDPStrategy(
        device,
        param_dtype=parse_dtype(options.get("fsdp_param_dtype"), "fsdp_param_dtype"),
        reduce_dtype=parse_dtype(options.get("fsdp_reduce_dtype", "fp32"), "fsdp_reduce_dtype"),
        activation_checkpointing=bool(options.get("activation_checkpointing") or False),
        compile=bool(options.get("compile") or False),
    )
