"""Mean loss of a model over batches: shared by training's periodic eval and eval.evaluate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


@torch.no_grad()
def loss_totals(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token losses and the number of scored tokens (targets != -100), as float64
    tensors on the model's device, so that ranks can all-reduce them before dividing.
    autocast_dtype (e.g. torch.bfloat16) runs the forward under torch.autocast."""
    was_training = model.training
    model.eval()
    total = count = None
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ctx = (
                torch.autocast(x.device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                loss = model(x, y)  # mean over scored tokens of this batch
            n = (y != -100).sum()
            s = loss.double() * n
            total = s if total is None else total + s
            count = n.double() if count is None else count + n
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("no batches to evaluate: the split is empty or shorter than one window")
    return total, count


def mean_loss(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean cross entropy per scored token over the batches (one host sync, at the end)."""
    total, count = loss_totals(model, batches, max_batches, autocast_dtype)
    return (total / count).item()
