"""Mixture-of-experts FFN: token-choice top-k routing, dropless, with three load-balancing tools.

A MoE block replaces the dense MLP with n_experts SwiGLU experts and a router (Shazeer et al. 2017;
Fedus et al. 2022, Switch Transformer; Jiang et al. 2024, Mixtral), plus optional always-on shared
experts (Dai et al. 2024, DeepSeekMoE; DeepSeek-V3; Qwen2-MoE). Every token goes to its top-k experts
and none is dropped at any load (dropless, as MegaBlocks, Gale et al. 2023): the (token, expert) pairs
are sorted by expert and each expert runs once over its contiguous group, through a grouped matmul
(torch's grouped_mm) or a loop over experts; both compute the same function.

Load balancing:
- the auxiliary balance loss (Switch eq. 4) and the router z-loss (ST-MoE, Zoph et al. 2022, eq. 5),
  weighted by their coefficients; GPT.forward adds them to the gradient of the training loss but not
  to its value, so the loss a run logs and evaluates is the cross entropy alone;
- the auxiliary-loss-free bias (DeepSeek-V3, Liu et al. 2024, sec. 2.1.2): a per-expert bias added to
  the scores for the choice of experts only, moved after every optimizer step by after_step from the
  load it saw; a persistent buffer (saved with the weights), never touched by the gradient.
routing_health reports each MoE block's balance for the training log.

Expert weights are 3-D parameters, one (out, in) matrix per expert, as transformers' MixtralExperts
and torchtitan's GroupedExperts store them: w_up (E, 2H, C) holds [gate | up] rows, w_down (E, C, H).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.dtensor import is_dtensor


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K) rows sorted by group, w (G, N, K), offs (G,) int32 group ends -> (M, N): x_g @ w_g.T."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm  # the public name from torch 2.9 on
    return fn(x, w.transpose(-2, -1), offs=offs)


def use_grouped_mm(setting: bool | None, x: torch.Tensor) -> bool:
    """moe_grouped_mm=None: the grouped kernel where it runs natively -- CUDA, bfloat16 inputs (torch's
    grouped_mm docs: bf16 on SM >= 80); the loop elsewhere."""
    if setting is not None:
        return setting
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return x.is_cuda and dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8


class MoE(nn.Module):
    """(B, T, C) -> (B, T, C) in block `layer`. `shared` is the always-on shared-expert MLP, or None."""

    def __init__(self, cfg: ModelConfig, layer: int, shared: nn.Module | None = None):
        super().__init__()
        self.layer = layer
        E, C, H = cfg.n_experts, cfg.n_embd, cfg.expert_hidden
        self.n_experts, self.top_k = E, cfg.moe_top_k
        self.sigmoid, self.norm_topk, self.scale = cfg.moe_router == "sigmoid", cfg.moe_norm_topk, cfg.moe_route_scale
        self.aux_coef, self.z_coef, self.bias_rate = (
            cfg.moe_aux_loss_coef,
            cfg.moe_z_loss_coef,
            cfg.moe_bias_update_rate,
        )
        self.grouped = cfg.moe_grouped_mm
        self.router = nn.Linear(C, E, bias=False)
        self.w_up = nn.Parameter(torch.empty(E, 2 * H, C))  # per expert [gate | up] rows, as MLP.c_fc
        self.w_down = nn.Parameter(torch.empty(E, C, H))
        # DeepSeek-V3's routing bias b_e: saved with the weights, changed only by after_step.
        self.register_buffer("expert_bias", torch.zeros(E))
        self.shared = shared
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # Training statistics, plain attributes rather than buffers: DDP broadcasts buffers from rank 0
        # at every forward, which would overwrite each rank's own counts.
        self.load: torch.Tensor | None = None  # (E,) assignments per expert since the last after_step
        self.last_load: torch.Tensor | None = None  # (E,) the previous step's, for routing_health
        self.aux_loss: torch.Tensor | None = None  # weighted balance + z-loss of the last training forward
        self.balance_loss = self.z_loss = None  # their unweighted values, detached
        # Set by a parallel layout from outside (train/parallel/expert.py); one process leaves them as is.
        self.dispatch = None  # (moe, xs, counts) -> ys: run_experts over an expert-parallel group
        self.load_group = None  # the process group whose loads after_step sums (None: the whole world)
        self.grad_sync = None  # (moe) -> None: the gradient reductions the layout owes this block
        self.aux_weight = 1.0  # 1/tp where the tp ranks route slices of one sequence (mean, not sum)

    @torch.no_grad()
    def init_weights(self, std: float, proj_std: float) -> None:
        """Experts as the dense MLP: in-projections N(0, std), out-projections N(0, proj_std)."""
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=proj_std)
        self.expert_bias.zero_()

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits (N, E) float32 -> (scores (N, E), weights (N, k), experts (N, k) int64).

        The bias only chooses (DeepSeek-V3 eq. 16): the weights are the unbiased scores of the chosen.
        It applies whatever moe_bias_update_rate is (zero unless updated), so a trained bias keeps routing."""
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)  # (N, E)
        experts = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, experts)  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return scores, weights * self.scale, experts

    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (M, C) sorted by expert, counts (E,) rows per expert -> (M, C): each row through its expert."""
        # this rank's experts: all of them, or under expert parallelism its Shard(0) slice (E_local, ., .)
        w_up, w_down = (w.to_local() if is_dtensor(w) else w for w in (self.w_up, self.w_down))
        if use_grouped_mm(self.grouped, xs):
            offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") and xs.is_cuda else xs.dtype
            gate, up = grouped_mm(xs.to(dtype), w_up.to(dtype), offs).chunk(2, dim=-1)  # (M, H) each
            return grouped_mm(F.silu(gate) * up, w_down.to(dtype), offs)  # (M, C)
        out = []
        for e, rows in enumerate(xs.split(counts.tolist())):  # (count_e, C) each
            gate, up = F.linear(rows, w_up[e]).chunk(2, dim=-1)  # (count_e, H) each
            out.append(F.linear(F.silu(gate) * up, w_down[e]))  # (count_e, C)
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        logits = self.router(flat).float()  # (N, E): routing in float32 (Mixtral's router, DeepSeek-V3)
        scores, weights, experts = self.route(logits)
        flat_e = experts.flatten()  # (N*k,)
        # (E,) assignments per expert; index_add, not bincount, keeps the shape static for torch.compile
        counts = flat_e.new_zeros(self.n_experts).index_add_(0, flat_e, torch.ones_like(flat_e))
        order = flat_e.argsort(stable=True)  # (N*k,) assignments sorted by expert
        token = order // self.top_k  # (N*k,) the token of each sorted assignment
        xs = flat[token]  # (N*k, C) sorted by expert
        ys = self.run_experts(xs, counts) if self.dispatch is None else self.dispatch(self, xs, counts)  # (N*k, C)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        out = torch.zeros_like(flat, dtype=ys.dtype).index_add(0, token, ys).to(x.dtype)  # (N, C)
        if self.shared is not None:
            out = out + self.shared(flat)
        self.aux_loss = None
        if self.training:
            self.record(logits, scores, counts)
        return self.drop(out.view(B, T, C))

    def record(self, logits: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> None:
        """Set this forward's aux losses and add its load to the step's."""
        N = logits.shape[0]
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.sigmoid else scores  # (N, E), rows sum to 1
        frac = counts.float() / (N * self.top_k)  # (E,) f_e: share of the assignments, no gradient
        balance = self.n_experts * (frac * probs.mean(dim=0)).sum()  # Switch eq. 4; 1 when uniform
        z = logits.logsumexp(dim=-1).square().mean()  # ST-MoE eq. 5
        self.aux_loss = self.aux_weight * (self.aux_coef * balance + self.z_coef * z)
        self.balance_loss, self.z_loss = balance.detach(), z.detach()
        with torch.no_grad():
            self.load = counts.float() if self.load is None else self.load + counts


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE blocks of a model (bare or wrapped: DDP, FSDP, DeepSpeed, compile), in order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def take_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE blocks' weighted aux losses from the last training forward (each is taken once)."""
    total = None
    for m in moe_layers(model):
        if m.aux_loss is not None:
            total = m.aux_loss if total is None else total + m.aux_loss
            m.aux_loss = None
    return total


@torch.no_grad()
def after_step(model: nn.Module) -> None:
    """Call after every optimizer step. Moves each routing bias towards balance by the step's load
    (DeepSeek-V3 sec. 2.1.2: b_e -= rate if e is overloaded, += rate if underloaded), the load summed
    first over the ranks that route different tokens through these blocks (the blocks' load_group: a
    pipeline stage's ranks; the whole world by default) so that every rank makes the same move; then
    starts the next step's count. A no-op for dense models."""
    layers = [m for m in moe_layers(model) if m.load is not None]
    if not layers:
        return
    loads = torch.stack([m.load for m in layers])  # (L, E)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loads, group=layers[0].load_group)
    for m, load in zip(layers, loads, strict=True):
        if m.bias_rate > 0:
            m.expert_bias += m.bias_rate * torch.sign(load.mean() - load).to(m.expert_bias.dtype)
        m.last_load, m.load = load, None


@torch.no_grad()
def routing_health(model: nn.Module) -> dict[str, float]:
    """Per MoE block i (its block index) of the last step: moe/i/max_share and min_share (an expert's share of the
    assignments; 1/E each when balanced), balance_loss, z_loss, bias_range (max - min routing bias).
    Empty for dense models. One host sync."""
    out: dict[str, torch.Tensor] = {}
    for m in moe_layers(model):
        i = m.layer
        if m.last_load is None:
            continue
        share = m.last_load / m.last_load.sum().clamp_min(1)  # (E,)
        out.update({f"moe/{i}/max_share": share.max(), f"moe/{i}/min_share": share.min()})
        if m.balance_loss is not None:
            out.update({f"moe/{i}/balance_loss": m.balance_loss, f"moe/{i}/z_loss": m.z_loss})
        out[f"moe/{i}/bias_range"] = m.expert_bias.max() - m.expert_bias.min()
    if not out:
        return {}
    values = torch.stack([v.float() for v in out.values()]).tolist()
    return dict(zip(out, values, strict=True))


def inactive_params(model: nn.Module) -> int:
    """Routed-expert parameters that a token does not use: (E - k) / E of every MoE block's experts."""
    return sum((m.w_up.numel() + m.w_down.numel()) * (m.n_experts - m.top_k) // m.n_experts for m in moe_layers(model))
