"""The one sampling rule: next-token logits -> a token, for the training log's samples (train/sample.py)
and for eval/ (model/generation.py's loop, and the server's engine).

Temperature, then top-k (Fan et al. 2018), then top-p / nucleus (Holtzman et al. 2019, "The Curious
Case of Neural Text Degeneration"); temperature 0 is greedy. Draws come from a torch.Generator the
caller seeds, so that the same seed gives the same tokens and sampling never moves the global RNG.
"""

from __future__ import annotations

import torch


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits (B, V) -> the sampling distribution (B, V) after temperature, top-k and top-p."""
    if temperature <= 0:
        raise ValueError("temperature 0 is greedy decoding: use argmax, not a distribution")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # the first token always stays (before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,) int64; temperature 0 takes the most likely token."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
