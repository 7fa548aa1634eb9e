"""MeshStrategy with a pipeline dimension (parallel.pp > 1): the seam's methods over this rank's stages.

wrap             split the GPT into stages (train/parallel/pipeline.py), each through the mesh's
                 parallelize (tensor + sequence parallel over tp, FSDP / HSDP over the data-parallel
                 ranks), one optimizer over them
forward_backward the schedule over all of the step's micro-batches (under cp, each cp rank's chunks
                 of them); the loss broadcast from the last stage, so every rank logs it
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

from model.generation import Decoder
from model.io import clean_state_dict
from train.parallel.context import ContextParallel
from train.parallel.expert import sync_moe_grads
from train.parallel.mesh_strategy import MeshStrategy
from train.parallel.parallelize import parallelize, uses_loss_parallel
from train.parallel.pipeline import (
    PipelineModel,
    build_schedule,
    check_schedule,
    clip_grad_norm_,
    merge_stages,
    pipeline_step,
    split_stages,
    sync_tied_grads,
    sync_tied_weights,
)
from train.parallel.world import StrategyError, broadcast_module_
from train.strategy import BuildOptimizer, unwrap


def bare_order(name: str) -> tuple[int, int]:
    """A parameter name's place in the bare GPT: embeddings, then blocks by index, then the final
    norm and the head (sorted() keeps the order within a block)."""
    if name.startswith("transformer.h."):
        return 1, int(name.split(".")[2])
    return (2, 0) if name.startswith(("transformer.ln_f", "lm_head")) else (0, 0)


class PipelineStrategy(MeshStrategy):
    def __init__(self, dims, device, spec, schedule: str = "1F1B", **kwargs):
        # user errors, before the process group: one line each
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
        self.loss_parallel = self.dims.tp > 1 and uses_loss_parallel(bare)  # the last stage's head
        try:
            stages = split_stages(bare, self.dims.pp_rank, self.dims.pp, self.dims.pp_stages_per_rank)
        except ValueError as e:
            raise StrategyError(str(e)) from None
        if self.dims.cp > 1:  # each stage's attention all-gathers K and V over the cp group
            self.cp = ContextParallel(bare.config, self.mesh["cp"])
        for stage in stages:  # torchtitan: each model chunk goes through the layout's transforms
            stage.sharded = self.cp
            parallelize(stage, self.dims, self.mesh, self.spec, self.mp_policy, self.async_tp)
            if meta:
                stage.to_empty(device=self.device)
                stage.init_weights()
        sync_tied_weights(stages, self.pp_group)  # a tied table: the last stage's copy is the first's
        self.stages, self.bare = stages, merge_stages(stages)
        self.model = self.bare
        self.schedule = build_schedule(
            stages, self.pp_group, self.spec.grad_accum_steps, self.schedule_name, self.device
        )
        self.view = PipelineModel(stages, self.pp_group, seq_shards=self.dims.tp)
        self.optimizer = build_optimizer(self.bare)  # over this rank's stages, bare names
        return self.model, self.optimizer

    def forward_backward(self, micro_batches, amp):
        if self.cp is not None:  # this cp rank's chunks of each window: (b, T / cp)
            micro_batches = [(self.cp.shard(x), self.cp.shard(y)) for x, y in micro_batches]
        with amp, self.loss_context():  # the schedule runs the loss and every backward inside
            loss = pipeline_step(self.schedule, micro_batches, self.pp_group)
        sync_tied_grads(self.stages, self.pp_group)
        return loss

    def clip_and_step(self, gate=None) -> torch.Tensor:
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        sync_moe_grads(self.bare)  # MoE blocks under tp (train/parallel/expert.py)
        norm = clip_grad_norm_(self.stages, max_norm, self.pp_group)
        if gate is not None and not gate(norm):  # train/guard.py: skip this update on every rank
            return norm
        self.optimizer.step()
        return norm

    def eval_model(self) -> nn.Module:
        return self.view

    def sample_decoder(self) -> Decoder:
        if self.dims.tp > 1:  # MeshStrategy's whole windows, through eval_model: the view
            return super().sample_decoder()
        return self.cached_decoder(self.view)

    def state_dicts(self) -> tuple[dict, dict]:
        """As MeshStrategy's, with each optimizer group's parameter names over every stage: DCP keeps one
        copy of what is not a tensor (the groups), so a group listing only this rank's stages would
        leave the other pp ranks' parameters out of their groups on load."""
        model_sd, optim_sd = super().state_dicts()
        mine = [list(g["params"]) for g in optim_sd["param_groups"]]
        everyone = [None] * self.dims.pp
        dist.all_gather_object(everyone, mine, group=self.pp_group)
        for i, group in enumerate(optim_sd["param_groups"]):
            names = [n for rank in everyone for n in rank[i]]
            group["params"] = sorted(dict.fromkeys(names), key=bare_order)
        return model_sd, optim_sd

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full bare state dict on rank 0: each stage's whole tensors (all-gathered over dp and tp
        by DTensor), sent from the first rank of each pp rank's group. Every rank calls."""
        if self.dims.shards_params:
            sd = get_model_state_dict(self.bare, options=StateDictOptions(full_state_dict=True))
        else:
            sd = clean_state_dict(self.bare.state_dict())
        c = self.dims.coords()
        first = all(i == 0 for d, i in c.items() if d != "pp")
        mine = {k: v.detach().cpu() for k, v in sd.items()} if first else {}
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, parts, dst=0)
        return {k: v for part in parts for k, v in part.items()} if self.is_main else {}

    def _release(self) -> None:
        self.stages = self.schedule = self.view = None
        super()._release()
