"""The HellaSwag scoring loop: this rank's share of the examples through the model, as counts.

`hellaswag_eval` is the one loop, run by `python -m eval.hellaswag` and by training's periodic evaluation
(train/hellaswag.py; train/ may import eval/'s library modules). data/hellaswag.py reads, checks and
renders the examples (Zellers et al. 2019; the llm.c and lm-evaluation-harness styles are described
there); the caller sums the counts over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from data.errors import DataError
from data.hellaswag import STYLES, render


@dataclass
class Counts:
    """What one rank found; add them over ranks (as a tensor: to_list / from_list) before dividing."""

    n: int = 0
    correct: int = 0
    correct_norm: int = 0
    truncated: int = 0  # examples with at least one row cut from the left to fit the context

    def to_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Counts:
        return cls(*(int(round(v)) for v in values))

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else math.nan

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.n if self.n else math.nan


def shard(n: int, rank: int, world_size: int) -> range:
    """The example indices of one rank: every world_size-th, starting at rank."""
    return range(rank, n, world_size)


def hellaswag_eval(
    model: Callable,
    tokenizer,
    examples: Sequence[dict],
    *,
    style: str = "llmc",
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    device="cpu",
    block_size: int | None = None,
    autocast_dtype=None,
    static_shape: bool = False,
    progress: bool = False,
    records: list[dict] | None = None,
) -> Counts:
    """This rank's counts over its share of `examples` (every world_size-th one, starting at `rank`).

    `model`: any callable idx -> logits (a GPT, or one wrapped by DDP / FSDP / compile); `tokenizer`: a
    tiktoken Encoding; `batch_size`: examples per forward pass (4 rows each). Every rank runs the same
    number of forward passes (a rank with fewer examples scores a one-token dummy row), because a
    sharded model's forward is a collective. `block_size` defaults to model.config.block_size.
    `static_shape` pads every batch to (4 * batch_size, block_size) rows x tokens, so that a compiled
    model sees one input shape (one graph) instead of one per batch length. `progress`: a tqdm bar.
    `records`, when given, receives one dict per scored example (its index, label, predictions, losses).
    """
    from tqdm import tqdm

    from model.scoring import score_batch  # torch is imported only by callers that score

    if style not in STYLES:
        raise DataError(f"unknown HellaSwag style {style!r}; choose one of {', '.join(STYLES)}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if block_size is None:
        block_size = _block_size(model)

    def encode(text: str) -> list[int]:
        return tokenizer.encode_ordinary(text)

    mine = list(shard(len(examples), rank, world_size))
    per_rank = -(-len(examples) // world_size)  # the most any rank holds
    n_batches = -(-per_rank // batch_size)
    shape = dict(length=block_size, rows=4 * batch_size) if static_shape else {}
    counts = Counts()
    for b in tqdm(range(n_batches), desc="hellaswag", unit="batch", disable=not progress):
        batch = mine[b * batch_size : (b + 1) * batch_size]
        rendered = [render(examples[i], encode, style) for i in batch]
        requests = [(r.context, e) for r in rendered for e in r.endings]
        scores = score_batch(
            model, requests or [([0], [0])], block_size, device=device, autocast_dtype=autocast_dtype, **shape
        )
        for k, (i, r) in enumerate(zip(batch, rendered, strict=True)):
            s = scores[4 * k : 4 * k + 4]
            loss = [x.loss for x in s]
            norm = [x.mean_loss for x in s] if r.norm is None else [x.loss / c for x, c in zip(s, r.norm, strict=True)]
            pred, pred_norm = _argmin(loss), _argmin(norm)
            label = examples[i]["label"]
            truncated = any(x.truncated for x in s)
            counts.n += 1
            counts.correct += pred == label
            counts.correct_norm += pred_norm == label
            counts.truncated += truncated
            if records is not None:
                records.append(
                    {
                        "index": i,
                        "label": label,
                        "pred": pred,
                        "pred_norm": pred_norm,
                        "loss": loss,
                        "tokens": [x.tokens for x in s],
                        "truncated": truncated,
                    }
                )
    return counts


def _argmin(values: Sequence[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)  # the first of equal values, as torch.argmin


def _block_size(model) -> int:
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "block_size"):
            return cfg.block_size
    raise ValueError("pass block_size: the model has no .config.block_size (nor its .module / ._orig_mod)")
