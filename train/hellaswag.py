"""HellaSwag during training (the config's `eval` section): the examples once at start-up, the
counts of every rank summed through the strategy.

The scoring is data/hellaswag.py's hellaswag_eval, the same function `python -m eval.hellaswag` runs
(train/ never imports eval/). It is handed the wrapped model (DDP / FSDP / DeepSpeed / compiled
blocks): every rank makes the same number of forward passes, as a sharded forward is a collective.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data.errors import DataError
from data.hellaswag import HF_NAME, HF_PREFIX, Counts, hellaswag_eval, load_examples
from model.dtypes import torch_dtype
from train.config import Config
from train.errors import ConfigError
from train.strategy import Strategy

# What the metrics record, the console line and the artifact metadata call the results.
KEYS = ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n", "hellaswag_truncated")


def load(cfg: Config) -> list[dict]:
    """The checked examples of eval.hellaswag_data (its first hellaswag_limit), or a ConfigError that
    says what to pass: raised on every rank alike, before any process group or model exists."""
    data, limit = cfg.eval.hellaswag_data, cfg.eval.hellaswag_limit
    if not data.startswith(HF_PREFIX) and not Path(data).is_file():
        raise ConfigError(
            f"eval.hellaswag_data={data}: no such file. Pass the rowanz/hellaswag validation file (JSONL; "
            f"docs/evaluation.md says where to get it) or eval.hellaswag_data={HF_PREFIX}{HF_NAME} with "
            "network access, or turn it off with eval.hellaswag_every=0"
        )
    try:
        return load_examples(data, "validation", limit)
    except DataError as e:  # data/hellaswag.py names the CLI's flag; here it is a config key
        raise ConfigError(f"eval.hellaswag_data={data}: {e}".replace("--data ", "eval.hellaswag_data=")) from None


def batch_size(cfg: Config) -> int:
    """Examples per forward pass: the config's, or as many as make train.micro_batch rows (4 per example)."""
    return cfg.eval.hellaswag_batch_size or max(1, cfg.train.micro_batch // 4)


def evaluate(model, tokenizer, examples: list[dict], strategy: Strategy, cfg: Config, block_size: int) -> Counts:
    """The counts over all examples, summed over ranks (rank r scores examples r, r + world_size, ...).

    Under train.compile every batch is padded to one shape (4 * batch_size rows x block_size), so the
    compiled blocks see a single shape rather than one per batch length. The forward runs under the
    run's autocast dtype, as the val loss does."""
    dtype = cfg.train.dtype
    counts = hellaswag_eval(
        model,
        tokenizer,
        examples,
        style=cfg.eval.hellaswag_style,
        batch_size=batch_size(cfg),
        rank=strategy.dp_rank,  # the ranks of one tp / cp / pp group score the same examples together
        world_size=strategy.dp_size,
        device=strategy.device,
        block_size=block_size,
        autocast_dtype=None if dtype == "float32" else torch_dtype(dtype),
        static_shape=cfg.train.compile,
    )
    # float64 counts: exact for any count below 2**53, and every backend (gloo, NCCL) sums them
    totals = torch.tensor(counts.to_list(), dtype=torch.float64, device=strategy.device)
    copies = strategy.world_size // strategy.dp_size  # each data-parallel rank's counts, once per group member
    return Counts.from_list((strategy.all_reduce_sum(totals) / copies).tolist())


def record(counts: Counts) -> dict:
    """The metrics of one evaluation, under KEYS."""
    return dict(zip(KEYS, (counts.acc, counts.acc_norm, counts.n, counts.truncated), strict=True))


def line(step: int, counts: Counts) -> str:
    """The console line."""
    cut = f", {counts.truncated} truncated to the context" if counts.truncated else ""
    return f"step {step} | hellaswag acc {counts.acc:.4f} | acc_norm {counts.acc_norm:.4f} ({counts.n} examples{cut})"
