"""The optimizers and the schedules (pure functions of the step).

optim.name=adamw: AdamW with weight-decay groups over every parameter.
optim.name=muon:  Muon (torch.optim.Muon: momentum orthogonalised by a Newton-Schulz iteration; Jordan
    et al. 2024, https://kellerjordan.github.io/posts/muon/) for the 2-D weight matrices inside the
    transformer blocks, AdamW for everything else -- embeddings, the head (tied or not), norm gains and
    biases -- each with its own learning rate (optim.muon_lr, optim.lr): the split of the Muon post and
    of modded-nanogpt (github.com/KellerJordan/modded-nanogpt, train_gpt.py). Both run as one
    torch.optim.Optimizer (MuonAdamW), so that strategies, the gradient scaler and checkpoints see one
    object with one state_dict.

The schedules are functions of the step alone -- no scheduler object with hidden state -- so that a
resumed run recomputes exactly the same learning rates and momentum from the step in the checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from train.config import OptimSection, ScheduleSection

MUON_GROUP = "muon"  # the `name` of the param group that Muon steps; every other group is AdamW's


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False, exclude=()) -> list[dict]:
    """Two AdamW groups: matmul weights decay; biases, norm gains (all < 2-D) and, unless asked,
    embedding tables do not (minGPT / nanoGPT's split; GPT-3 decays weights only, Brown et al. 2020).
    A tied lm_head shares the token embedding's Parameter, so it follows the embedding's rule.
    Parameters in `exclude` (Muon's) are left out."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay, seen = [], [], {id(p) for p in exclude}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in embedding_ids
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """The hidden weight matrices: every 2-D parameter inside the transformer blocks that is not an
    embedding table (attention q/k/v and output projections, MLP in and out). Embeddings, the head and
    the final norm live outside the blocks, so they stay with AdamW (Jordan et al. 2024: "Muon should
    only be used for hidden weight layers"; modded-nanogpt's hidden_matrix_params)."""
    blocks = model.transformer.h
    embedding_ids = {id(p) for m in blocks.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out, seen = [], set()
    for p in blocks.parameters():
        if p.requires_grad and p.dim() == 2 and id(p) not in embedding_ids and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over the groups named MUON_GROUP, torch.optim.AdamW over the others, as one
    Optimizer: param_groups, state, zero_grad, state_dict and load_state_dict are the base class's over
    all groups; step() steps both. The two inner optimizers share this object's group dicts and state,
    so a learning rate set on a group here is the one its optimizer uses.

    Under FSDP2 the parameters are DTensor row shards, and Newton-Schulz needs the whole matrix: each
    rank gathers the momentum-applied update (full_tensor), orthogonalises it, and keeps its own rows
    (sharded_muon_step). The momentum buffers stay sharded, like AdamW's moments."""

    def __init__(self, adamw_groups: list[dict], muon_groups: list[dict], adamw: dict, muon: dict):
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self.muon = torch.optim.Muon(muon_groups, **muon)
        self.n_adamw = len(self.adamw.param_groups)
        # defaults={}: every group arrives complete from its own optimizer
        super().__init__(self.adamw.param_groups + self.muon.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this object's groups and state (again after a load, which
        replaces both)."""
        self.adamw.param_groups, self.muon.param_groups = (
            self.param_groups[: self.n_adamw],
            self.param_groups[self.n_adamw :],
        )
        self.adamw.state = self.muon.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        if any(isinstance(p, DTensor) for g in self.muon.param_groups for p in g["params"]):
            for group in self.muon.param_groups:
                sharded_muon_step(group, self.state)
        else:
            self.muon.step()
        return loss


def sharded_muon_step(group: dict, state: dict) -> None:
    """torch.optim.Muon's step (torch/optim/_muon.py, _single_tensor_muon) for DTensor-sharded
    parameters: momentum on the local shard, Newton-Schulz on the gathered matrix (identical on every
    rank), then this rank's shard of the result (distribute_tensor without communication)."""
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad  # DTensor, this rank's rows of (out, in)
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(grad)
        buf = st["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        full = update.full_tensor()  # (out, in), the same on every rank
        ortho = _zeropower_via_newtonschulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
        local = distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
        p.mul_(1 - lr * wd)
        p.add_(local, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


def fused_supported(model: nn.Module) -> bool:
    """torch's fused AdamW kernels exist for CUDA, CPU (torch >= 2.4) and MPS floating-point params."""
    return all(p.device.type in ("cuda", "cpu", "mps") and p.is_floating_point() for p in model.parameters())


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    fused = fused_supported(model) if cfg.fused is None else cfg.fused
    adamw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_embeddings), **adamw)
    hidden = muon_params(model)
    muon_group = {"params": hidden, "name": MUON_GROUP}
    muon = dict(
        lr=cfg.muon_lr,
        momentum=cfg.muon_momentum,
        weight_decay=cfg.muon_weight_decay,
        nesterov=cfg.muon_nesterov,
        ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn=cfg.muon_adjust_lr,
    )
    # Without Muon's matrices, AdamW's decay group may be empty (a tied head); torch.distributed
    # .checkpoint's state dicts name groups by their parameters, so an empty group is left out.
    rest = [g for g in param_groups(model, cfg.weight_decay, cfg.decay_embeddings, exclude=hidden) if g["params"]]
    return MuonAdamW(rest, [muon_group], adamw, muon)


def lr_at(step: int, peak: float, cfg: ScheduleSection, max_steps: int) -> float:
    """Learning rate of the update made at `step` (0-based).

    warmup: linear from peak/warmup to peak over warmup_steps (llm.c's (step+1)/warmup, so step 0 is not 0).
    cosine: half a cosine from peak down to min_lr_ratio*peak at total_steps (Loshchilov & Hutter 2017;
            GPT-3 decays to 10% of peak, Brown et al. 2020 appendix B), constant after.
    wsd:    warmup-stable-decay: peak until the last decay_frac of total_steps, then linear or 1-sqrt
            down to the minimum (Hu et al. 2024, MiniCPM; Hägele et al. 2024). With min_lr_ratio=0 and
            no warmup, the linear shape is modded-nanogpt's schedule (constant, then a linear cooldown
            to 0 over the last cooldown_frac = decay_frac of the steps), value for value.
    constant: peak after warmup.
    """
    total = cfg.total_steps or max_steps
    lo = peak * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak
    if step >= total:
        return lo
    if cfg.name == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / span  # [0, 1)
        return lo + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - lo)
    # wsd
    decay_steps = max(1, round(cfg.decay_frac * total))
    start = max(cfg.warmup_steps, total - decay_steps)
    if step < start:
        return peak
    progress = (step - start) / max(1, total - start)  # [0, 1)
    frac = 1.0 - progress if cfg.wsd_shape == "linear" else 1.0 - math.sqrt(progress)
    return lo + frac * (peak - lo)


def muon_momentum_at(step: int, cfg: OptimSection) -> float:
    """Muon's momentum at `step`: linear from muon_momentum_start to muon_momentum over the first
    muon_momentum_warmup_steps, then constant (modded-nanogpt: 0.85 -> 0.95 over 300 steps)."""
    if step >= cfg.muon_momentum_warmup_steps:
        return cfg.muon_momentum
    frac = step / cfg.muon_momentum_warmup_steps  # [0, 1)
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def apply_schedule(
    optimizer: torch.optim.Optimizer, step: int, optim: OptimSection, schedule: ScheduleSection, max_steps: int
) -> float:
    """Set every group's learning rate for `step` -- its own peak (optim.muon_lr for Muon's group,
    optim.lr for AdamW's) through the one schedule -- and Muon's momentum; returns AdamW's lr."""
    lr = lr_at(step, optim.lr, schedule, max_steps)
    for group in optimizer.param_groups:
        if group.get("name") == MUON_GROUP:
            group["lr"] = lr_at(step, optim.muon_lr, schedule, max_steps)
            group["momentum"] = muon_momentum_at(step, optim)
        else:
            group["lr"] = lr
    return lr
