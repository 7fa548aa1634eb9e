"""eval's side of generation: the no-cache reference loop and streaming text.

The loop itself is model.generation.generate (prefill once, then one token per step through a
backend's KV cache; crops past the context), the one the training log's samples drive too; it is
re-exported here for eval's commands, with its argument checks (check_sampling).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

import torch

from model.generation import check_sampling, generate

__all__ = ["TextStream", "check_sampling", "generate", "generate_no_cache"]


@torch.no_grad()
def generate_no_cache(
    forward: Callable[[torch.Tensor], torch.Tensor],
    prompt: Sequence[int],
    max_new_tokens: int,
    block_size: int,
    keep: int | None = None,
) -> list[int]:
    """Greedy decoding that re-runs the whole context every step (nanoGPT's `generate`): the reference
    the KV-cache engine must match token for token, and the baseline of the bench's speed-up.

    Past the context, keep=None slides the window by one token per step (nanoGPT's crop); an int
    crops as the engine does: when the window would outgrow the context it restarts at the last
    `keep` tokens and grows again."""
    idx = torch.tensor([list(prompt)], dtype=torch.long)  # (1, T)
    start = 0  # the window's first token
    for _ in range(max_new_tokens):
        if keep is None:
            start = max(0, idx.shape[1] - block_size)
        elif idx.shape[1] - start > block_size:
            start = idx.shape[1] - keep
        logits = forward(idx[:, start:])[:, -1]  # (1, V)
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


class TextStream:
    """Token ids -> text pieces, holding back the bytes of an unfinished UTF-8 character (a byte
    tokenizer splits every non-ASCII character over several tokens)."""

    def __init__(self, enc):
        self.enc = enc
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.utf8.decode(self.enc.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)
