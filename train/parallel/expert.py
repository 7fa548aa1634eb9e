"""Expert parallelism (and tensor parallelism) for the mixture-of-experts blocks of model/moe.py.

Expert parallel (Lepikhin et al. 2020, GShard; Fedus et al. 2022, Switch Transformer): the ep ranks of a
group each hold n_experts / ep experts of every MoE block, their w_up / w_down a DTensor Shard(0) over
the group (so that DCP reshards them across ep degrees like any other dimension). Each rank routes its
own tokens, sends every (token, expert) row to the rank that holds the expert with one all_to_all, runs
its experts over what it received, and sends the results back with a second all_to_all: torchtitan's
AllToAllTokenDispatcher (torchtitan/models/common/token_dispatcher.py). Dropless, so the split sizes
change every step: the counts are exchanged first (one small all_to_all and a host sync). The gradient
flows back through the autograd of torch's functional all_to_all.

ep borrows its ranks from dp_shard x cp (train/parallel/dims.py): that flat group of S ranks splits into
S / ep replicas x ep, ep innermost. The expert mesh (pp, edp, ep) names, for each rank, its ep group and
its edp group: every rank that holds the same experts (dp_replicate x S / ep x tp). The experts stay out
of FSDP (whole on each rank of edp; torchtitan also shards them over it, its "efsdp"); their gradients
are summed over edp and divided by the data-parallel size: the mean FSDP forms for every other parameter.

Tensor parallel: a MoE block routes this rank's slice of the sequence (the sequence-parallel activation
between blocks), so the tp ranks see different tokens as data-parallel ranks do. Its replicated
parameters (router, shared experts, and the experts without ep) then get their gradient as a sum over
tp, and its aux losses a weight of 1 / tp: the mean over the slices, as over data-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from model.moe import MoE, moe_layers


class ExpertParallel:
    """MoE.dispatch over one ep group: (moe, xs (M, C) sorted by global expert, counts (E,)) -> (M, C)."""

    def __init__(self, group: dist.ProcessGroup, ep: int):
        self.group, self.ep = group, ep

    def __call__(self, moe: MoE, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, n_local = self.ep, moe.n_experts // self.ep  # rank j holds experts [j * n_local, (j + 1) * n_local)
        got_counts = torch.empty_like(counts)  # (ep * n_local,): rows each source rank sends each of my experts
        dist.all_to_all_single(got_counts, counts, group=self.group)
        send = counts.view(ep, n_local).sum(1).tolist()  # rows to each rank
        recv = got_counts.view(ep, n_local).sum(1).tolist()  # rows from each rank
        got = funcol.all_to_all_single_autograd(xs, recv, send, self.group)  # (R, C) by source, then expert
        # (R,) the local expert of each received row; sort them by expert (stable: by source inside)
        expert = torch.arange(n_local, device=xs.device).repeat(ep).repeat_interleave(got_counts)
        order = expert.argsort(stable=True)
        ys = moe.run_experts(got[order], got_counts.view(ep, n_local).sum(0))  # (R, C) sorted by expert
        back = ys[order.argsort()]  # (R, C) in the order received
        return funcol.all_to_all_single_autograd(back, send, recv, self.group)  # (M, C) as xs


class GradSync:
    """MoE.grad_sync: the gradient reductions a layout owes one block, before the norm and the step."""

    def __init__(self, tp_group, edp_group, dp_size: int):
        self.tp_group, self.edp_group, self.dp_size = tp_group, edp_group, dp_size

    @torch.no_grad()
    def __call__(self, moe: MoE) -> None:
        experts = {id(moe.w_up), id(moe.w_down)} if self.edp_group is not None else set()
        for p in moe.parameters():
            if p.grad is None:
                continue
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # in place on this rank's part
            if id(p) in experts:  # summed over the ranks holding these experts, then the data-parallel mean
                if dist.get_world_size(self.edp_group) > 1:
                    dist.all_reduce(g, group=self.edp_group)
                g.div_(self.dp_size)
            elif self.tp_group is not None:  # each tp rank saw its slice of the sequence
                dist.all_reduce(g, group=self.tp_group)


def expert_mesh(dims, device_type: str):
    """The (pp, edp, ep) mesh of expert parallel, from the rank order of dims.build_mesh: ranks are
    row-major over (pp, dp_replicate, S / ep, ep, tp) with S = dp_shard x cp, so ep and edp are that
    view with ep moved last."""
    from torch.distributed.device_mesh import DeviceMesh

    S = dims.dp_shard * dims.cp
    ranks = torch.arange(dims.world_size).view(dims.pp, dims.dp_replicate, S // dims.ep, dims.ep, dims.tp)
    ranks = ranks.permute(0, 1, 2, 4, 3).reshape(dims.pp, -1, dims.ep)  # (pp, edp, ep)
    return DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "edp", "ep"))


def apply_moe(model: nn.Module, dims, mesh) -> list[nn.Parameter]:
    """Set up every MoE block of `model` for the layout: shard the experts over ep (returning them:
    FSDP must leave them alone), dispatch through all_to_all, the tp slicing, the load group of
    after_step and the gradient reductions. A no-op for dense models and for one process."""
    layers = moe_layers(model)
    if not layers or mesh is None:
        return []
    from torch.distributed.tensor import Shard, distribute_tensor

    tp_group = mesh["tp"].get_group() if dims.tp > 1 else None
    ep_mesh = edp_group = None
    if dims.ep > 1:
        emesh = expert_mesh(dims, mesh.device_type)
        ep_mesh, edp_group = emesh["ep"], emesh["edp"].get_group()
    load_group = None  # the whole world: every rank routes tokens of its own through every block
    if dims.pp > 1:  # a stage's blocks: the ranks of this stage
        load_group = mesh["dp_replicate", "dp_shard", "cp", "tp"]._flatten("moe_load").get_group()
    experts = []
    for m in layers:
        m.load_group = load_group
        m.aux_weight = 1.0 / dims.tp
        if tp_group is not None or edp_group is not None:
            m.grad_sync = GradSync(tp_group, edp_group, dims.dp_cp_size)
        if ep_mesh is not None:
            for name in ("w_up", "w_down"):
                full = getattr(m, name)  # (E, ., .), equal on every rank (wrap broadcast rank 0's)
                shard = nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)]), full.requires_grad)
                setattr(m, name, shard)
                experts.append(shard)
            m.dispatch = ExpertParallel(ep_mesh.get_group(), dims.ep)
    return experts


def sync_moe_grads(model: nn.Module) -> None:
    """The reductions GradSync owes each MoE block; call after the last backward of a step."""
    for m in moe_layers(model):
        if m.grad_sync is not None:
            m.grad_sync(m)


def tp_plan() -> dict:
    """The tensor-parallel plan of a MoE block's FFN: it keeps this rank's sequence slice (Shard(1))."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    keep = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True)
    return {"mlp": keep}
