"""Log-likelihood of continuations: what multiple-choice evaluation (HellaSwag, lm-eval) asks of a model.

A request is a pair (context tokens, continuation tokens). Each becomes one row, context + continuation,
fed once; the loss is taken over the continuation tokens only (llm.c's dev/data/hellaswag.py masks the
same way). Rows of a batch are right-padded: under a causal mask padding after a row's last token
changes none of its logits, so a batched score is the score of the row alone.

A row longer than the model's context keeps its last block_size + 1 tokens, as lm-evaluation-harness's
`hf` model does (the context is cut from the left; the continuation too when it alone is longer than
the context), and is reported as truncated.

`model` is any callable idx (B, T) -> logits (B, T, V): a GPT, or one wrapped by DDP / FSDP / DeepSpeed /
torch.compile. Scoring draws no random numbers (an nn.Module is put in eval mode for the call, so no
dropout runs), so a training run that scores in between steps keeps its RNG stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


@dataclass(frozen=True)
class Score:
    """The score of one continuation."""

    loss: float  # summed cross entropy over the scored continuation tokens, in nats (= -log p(continuation))
    tokens: int  # how many continuation tokens were scored
    greedy: bool  # every scored token is the argmax of the model's prediction at its position
    truncated: bool  # the row did not fit the context and lost tokens from the left

    @property
    def mean_loss(self) -> float:
        return self.loss / self.tokens


def window(context: Sequence[int], continuation: Sequence[int], block_size: int) -> tuple[list[int], int, bool]:
    """(row, n_scored, truncated): the tokens of the row (at most block_size + 1; the model reads all but
    the last), how many of its last tokens are continuation tokens to score, and whether it was cut."""
    if len(context) == 0 or len(continuation) == 0:
        raise ValueError(
            f"a request needs at least one context token and one continuation token "
            f"(got {len(context)} and {len(continuation)}); prefix an empty context with <|endoftext|>"
        )
    row = [*context, *continuation]
    truncated = len(row) > block_size + 1
    if truncated:
        row = row[-(block_size + 1) :]
    return row, min(len(continuation), len(row) - 1), truncated


def pack(
    requests: Sequence[Request], block_size: int, length: int | None = None, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """(idx (B, T), targets (B, T), truncated): right-padded inputs, and targets that are -100 except at
    the continuation tokens. `length` / `rows` pad to a fixed shape (one graph for a compiled model)."""
    windows = [window(c, x, block_size) for c, x in requests]
    T = max(len(r) - 1 for r, _, _ in windows)
    T = max(T, length or 0)
    B = max(len(windows), rows or 0)
    idx = torch.zeros(B, T, dtype=torch.long)  # pad token 0: only ever read by positions after a row's end
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, (row, n, _) in enumerate(windows):
        L = len(row) - 1
        idx[b, :L] = torch.tensor(row[:-1])
        targets[b, L - n : L] = torch.tensor(row[L - n + 1 :])
    return idx, targets, [t for _, _, t in windows]


@torch.no_grad()
def score_batch(
    model: Callable[[torch.Tensor], torch.Tensor],
    requests: Sequence[Request],
    block_size: int,
    *,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    length: int | None = None,
    rows: int | None = None,
) -> list[Score]:
    """The scores of the requests, in one forward pass."""
    idx, targets, truncated = pack(requests, block_size, length, rows)
    idx, targets = idx.to(device), targets.to(device)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        ctx = (
            torch.autocast(idx.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            logits = model(idx)  # (B, T, V)
    finally:
        if was_training:
            model.train()
    scored = targets != -100  # (B, T)
    picked = logits[scored].float()  # (N, V): only the continuation positions, in row order
    y = targets[scored]  # (N,)
    losses = F.cross_entropy(picked, y, reduction="none").double()  # (N,)
    hits = picked.argmax(-1) == y  # (N,)
    row_of = scored.nonzero()[:, 0]  # (N,) the row of each scored position
    n = len(requests)
    loss = torch.zeros(logits.shape[0], dtype=torch.float64, device=idx.device).index_add_(0, row_of, losses)
    misses = torch.zeros(logits.shape[0], dtype=torch.long, device=idx.device).index_add_(0, row_of, (~hits).long())
    counts = scored.sum(1)
    loss, misses, counts = loss[:n].tolist(), misses[:n].tolist(), counts[:n].tolist()  # one host sync
    return [Score(loss[i], counts[i], misses[i] == 0, truncated[i]) for i in range(n)]


def score(
    model: Callable[[torch.Tensor], torch.Tensor],
    requests: Sequence[Request],
    block_size: int,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> list[Score]:
    """The scores of any number of requests, `batch_size` rows per forward pass, in the order given.

    Rows are batched longest first (as lm-eval does), so that rows of similar length share a batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    out: list[Score | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        got = score_batch(model, [requests[i] for i in chunk], block_size, device=device, autocast_dtype=autocast_dtype)
        for i, s in zip(chunk, got, strict=True):
            out[i] = s
    return out  # type: ignore[return-value]
