"""The one table of dtype names. Configs and CLIs speak in names; torch only where tensors are made.

Each dtype has a canonical name (torch's: float32, bfloat16, float16) and a short alias (fp32, bf16,
fp16) that the CLIs and DeepSpeed use. This module imports torch only inside `torch_dtype`, so that
train/config.py can check a name without importing torch.
"""

from __future__ import annotations

CANONICAL = ("float32", "bfloat16", "float16")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_BY_NAME = {**{n: n for n in CANONICAL}, **{s: n for n, s in SHORT.items()}}


def canonical(name: str) -> str:
    """'bf16' / 'bfloat16' / 'BF16' -> 'bfloat16'; ValueError naming the choices otherwise."""
    try:
        return _BY_NAME[str(name).lower()]
    except KeyError:
        choices = f"{', '.join(CANONICAL)} (or {', '.join(SHORT.values())})"
        raise ValueError(f"unknown dtype {name!r}; use one of {choices}") from None


def short(name: str) -> str:
    """'bfloat16' / 'bf16' -> 'bf16'."""
    return SHORT[canonical(name)]


def torch_dtype(name: str):
    """'bf16' / 'bfloat16' -> torch.bfloat16."""
    import torch

    return getattr(torch, canonical(name))
