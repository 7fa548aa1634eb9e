"""MeshStrategy with a pipeline dimension (parallel.pp > 1): the seam's methods over this rank's stages.

wrap             split the GPT into stages (train/parallel/pipeline.py), each through the mesh's
                 parallelize (FSDP / HSDP over the data-parallel ranks), one optimizer over them
forward_backward the schedule over all of the step's micro-batches; the loss broadcast from the
                 last stage, so every rank logs it
clip_and_step    the gradients' norm over every stage (and, through DTensor, every dp rank)
eval_model       PipelineModel: forward-only, the same for evaluation, HellaSwag and sampling
checkpoints      MeshStrategy's DCP save / load over the stages' bare names (a subset per pp rank),
                 so a pipelined checkpoint resumes on any layout and any layout's on this one
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from model.io import clean_state_dict
from train.parallel.expert import sync_moe_grads
from train.parallel.mesh_strategy import MeshStrategy
from train.parallel.parallelize import parallelize
from train.parallel.pipeline import (
    PipelineModel,
    build_schedule,
    check_schedule,
    clip_grad_norm_,
    merge_stages,
    pipeline_step,
    split_stages,
)
from train.parallel.world import StrategyError, broadcast_module_
from train.strategy import BuildOptimizer, unwrap


class PipelineStrategy(MeshStrategy):
    def __init__(self, dims, device, spec, schedule: str = "1F1B", **kwargs):
        # user errors, before the process group: one line each
        if dims.tp > 1 or dims.cp > 1:
            raise StrategyError(
                f"parallel.pp={dims.pp} composes with data parallel only here; set parallel.tp=1 and parallel.cp=1"
            )
        if spec.precision == "fp16":
            raise StrategyError("parallel.pp > 1 runs in bfloat16 or float32: set train.dtype=bfloat16")
        try:
            check_schedule(schedule, dims.pp, dims.pp_stages_per_rank, spec.grad_accum_steps)
        except ValueError as e:
            raise StrategyError(str(e)) from None
        super().__init__(dims, device, spec, **kwargs)
        self.name = "mesh"
        # the weights live in state/ (each pp rank saves its stages); model/ is written at best and final
        self.weights_in_state = True
        self.schedule_name, self.stages, self.schedule, self.view = schedule, None, None, None

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh["pp"].get_group()

    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer):
        bare = unwrap(model)
        meta = any(p.is_meta for p in bare.parameters())
        if not meta:
            bare.to(self.device)
            broadcast_module_(bare)  # every rank starts from rank 0's weights
        self.mesh = self.dims.build_mesh(self.device.type)
        try:
            stages = split_stages(bare, self.dims.pp_rank, self.dims.pp, self.dims.pp_stages_per_rank)
        except ValueError as e:
            raise StrategyError(str(e)) from None
        for stage in stages:  # torchtitan: each model chunk goes through the layout's transforms
            parallelize(stage, self.dims, self.mesh, self.spec, self.mp_policy)
            if meta:
                stage.to_empty(device=self.device)
                stage.init_weights()
        self.stages, self.bare = stages, merge_stages(stages)
        self.model = self.bare
        self.schedule = build_schedule(
            stages, self.pp_group, self.spec.grad_accum_steps, self.schedule_name, self.device
        )
        self.view = PipelineModel(stages, self.pp_group)
        self.optimizer = build_optimizer(self.bare)  # over this rank's stages, bare names
        return self.model, self.optimizer

    def forward_backward(self, micro_batches, amp):
        with amp:
            return pipeline_step(self.schedule, micro_batches, self.pp_group)

    def clip_and_step(self, gate=None) -> torch.Tensor:
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        sync_moe_grads(self.bare)  # MoE blocks under tp (train/parallel/expert.py)
        norm = clip_grad_norm_(self.bare.parameters(), max_norm, self.pp_group)
        if gate is not None and not gate(norm):  # train/guard.py: skip this update on every rank
            return norm
        self.optimizer.step()
        return norm

    def eval_model(self) -> nn.Module:
        return self.view

    def sample_model(self) -> nn.Module:
        return self.view

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full bare state dict on rank 0: each stage's whole tensors (all-gathered over dp by
        FSDP), sent from the first data-parallel rank of each pp rank. Every rank calls."""
        if self.dims.uses_fsdp:
            sd = get_model_state_dict(self.bare, options=StateDictOptions(full_state_dict=True))
        else:
            sd = clean_state_dict(self.bare.state_dict())
        c = self.dims.coords()
        mine = {k: v.detach().cpu() for k, v in sd.items()} if c["dp_replicate"] == c["dp_shard"] == 0 else {}
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, parts, dst=0)
        return {k: v for part in parts for k, v in part.items()} if self.is_main else {}

    def _release(self) -> None:
        self.stages = self.schedule = self.view = None
        super()._release()
