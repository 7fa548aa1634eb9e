"""AdamW with weight-decay groups, and the learning-rate schedules (pure functions of the step).

The schedule is a function of the step alone -- no scheduler object with hidden state -- so that a
resumed run recomputes exactly the same learning rate from the step saved in the checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from train.config import OptimSection, ScheduleSection


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups: matmul weights decay; biases, norm gains (all < 2-D) and, unless asked,
    embedding tables do not (minGPT / nanoGPT's split; GPT-3 decays weights only, Brown et al. 2020).
    A tied lm_head shares the token embedding's Parameter, so it follows the embedding's rule."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay, seen = [], [], set()
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


def fused_supported(model: nn.Module) -> bool:
    """torch's fused AdamW kernels exist for CUDA, CPU (torch >= 2.4) and MPS floating-point params."""
    return all(p.device.type in ("cuda", "cpu", "mps") and p.is_floating_point() for p in model.parameters())


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    fused = fused_supported(model) if cfg.fused is None else cfg.fused
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.decay_embeddings),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused or None,
    )


def lr_at(step: int, peak: float, cfg: ScheduleSection, max_steps: int) -> float:
    """Learning rate of the update made at `step` (0-based).

    warmup: linear from peak/warmup to peak over warmup_steps (llm.c's (step+1)/warmup, so step 0 is not 0).
    cosine: half a cosine from peak down to min_lr_ratio*peak at total_steps (Loshchilov & Hutter 2017;
            GPT-3 decays to 10% of peak, Brown et al. 2020 appendix B), constant after.
    wsd:    warmup-stable-decay: peak until the last decay_frac of total_steps, then linear or 1-sqrt
            down to the minimum (Hu et al. 2024, MiniCPM; Hägele et al. 2024).
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
