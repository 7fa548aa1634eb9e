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

from model.dtensor import is_dtensor
from train.config import OptimSection, ScheduleSection
from train.errors import TrainError

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
    only be used for hidden weight layers"; modded-nanogpt's hidden_matrix_params). A 3-D parameter
    (a mixture of experts' weights, one matrix per expert) is a batch of such matrices."""
    blocks = model.transformer.h
    embedding_ids = {id(p) for m in blocks.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out, seen = [], set()
    for p in blocks.parameters():
        if p.requires_grad and p.dim() in (2, 3) and id(p) not in embedding_ids and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class MuonAdamW(torch.optim.Optimizer):
    """Muon over the groups named MUON_GROUP, torch.optim.AdamW over the others, as one Optimizer:
    param_groups, state, zero_grad, state_dict and load_state_dict are the base class's over all
    groups; step() steps both. torch.optim.Muon builds and checks Muon's groups (its hyper-parameters,
    2-D parameters only); muon_step steps them -- torch.optim.Muon's update, with Newton-Schulz in a
    chosen dtype and on FSDP2's sharded parameters. The inner optimizers share this object's group
    dicts and state, so a learning rate set on a group here is the one that is used."""

    def __init__(self, adamw_groups: list[dict], muon_groups: list[dict], adamw: dict, muon: dict, ns_dtype: str):
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        # torch.optim.Muon accepts 2-D parameters only; 3-D expert weights join its groups after that check.
        batched = [[p for p in g["params"] if p.dim() == 3] for g in muon_groups]
        self.muon = torch.optim.Muon(
            [{**g, "params": [p for p in g["params"] if p.dim() == 2]} for g in muon_groups], **muon
        )
        for group, extra in zip(self.muon.param_groups, batched, strict=True):
            group["params"].extend(extra)
        for group in self.muon.param_groups:
            group["ns_dtype"] = ns_dtype  # a name, not a torch.dtype: the state dict stays plain data
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
        for group in self.muon.param_groups:
            muon_step(group, self.state)
        return loss


def newton_schulz(g: torch.Tensor, coefficients: tuple, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (torch/optim/_muon.py,
    _zeropower_via_newtonschulz; Jordan et al. 2024), which maps g = U S V^T to about U V^T, in
    `dtype`: torch's always runs in bfloat16, which CPUs without bf16 units emulate (slowly). A 3-D g
    (E, m, n) is E separate matrices (a mixture of experts' weights), each orthogonalised on its own."""
    if g.dim() == 3:
        return torch.stack([newton_schulz(m, coefficients, steps, eps, dtype) for m in g])
    a, b, c = coefficients
    x = g.to(dtype)  # (m, n)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T  # (n, m): the Gram matrix below is the smaller side
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T  # (k, k), k = min(m, n)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's _adjust_lr: the update's scale per matrix shape (rows A, columns B):
    original: sqrt(max(1, A/B)) (Jordan et al. 2024); match_rms_adamw: 0.2 * sqrt(max(A, B)), AdamW's
    update RMS (Liu et al. 2025, "Muon is Scalable for LLM Training")."""
    rows, cols = shape[-2:]  # of each matrix: a 3-D (E, rows, cols) weight is E of them
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


def muon_step(group: dict, state: dict) -> None:
    """torch.optim.Muon's step (torch/optim/_muon.py, _single_tensor_muon) over one group. A DTensor
    parameter (FSDP2: this rank's rows) keeps its momentum sharded; Newton-Schulz needs the whole
    matrix, so the update is gathered (full_tensor, the same on every rank), orthogonalised, and this
    rank's rows are kept (distribute_tensor from the local copy, without communication)."""
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    dtype = getattr(torch, group["ns_dtype"])
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad  # (out, in), or a DTensor of this rank's rows
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(grad)
        buf = st["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        sharded = is_dtensor(update)
        full = update.full_tensor() if sharded else update  # (out, in)
        ortho = newton_schulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
        if sharded:
            from torch.distributed.tensor import distribute_tensor

            ortho = distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
        p.mul_(1 - lr * wd)
        p.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))


def fused_supported(model: nn.Module) -> bool:
    """torch's fused AdamW kernels exist for CUDA, CPU (torch >= 2.4) and MPS floating-point params."""
    return all(p.device.type in ("cuda", "cpu", "mps") and p.is_floating_point() for p in model.parameters())


def mixes_dtensors(model: nn.Module) -> bool:
    """Whether some parameters are DTensors and some plain tensors (tensor parallel without FSDP keeps
    the replicated embeddings plain). torch's fused and foreach AdamW kernels take one kind per call."""
    kinds = {is_dtensor(p) for p in model.parameters()}
    return len(kinds) == 2


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    mixed = mixes_dtensors(model)
    if mixed and cfg.fused:
        raise TrainError(
            "optim.fused=true cannot step a model whose parameters mix DTensors and plain tensors "
            "(tensor parallel without FSDP): set optim.fused=false or leave it null"
        )
    fused = fused_supported(model) and not mixed if cfg.fused is None else cfg.fused
    adamw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
    if mixed:  # the per-parameter loop: each update sees one tensor kind
        adamw["foreach"] = False
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
    return MuonAdamW(rest, [muon_group], adamw, muon, muon_ns_dtype(cfg.muon_ns_dtype, hidden))


def muon_ns_dtype(name: str, params: list[torch.Tensor]) -> str:
    """optim.muon_ns_dtype=auto: bfloat16 (torch.optim.Muon's, Jordan et al. 2024) where the device has
    bf16 matrix units, as train.dtype=auto decides; float32 elsewhere."""
    if name != "auto":
        return name
    from train.device import resolve_dtype

    device = params[0].device if params else torch.device("cpu")
    return "bfloat16" if resolve_dtype(device) == "bfloat16" else "float32"


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
