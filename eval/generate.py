"""eval's side of generation: the user-facing checks, the no-cache reference loop and streaming text.

The loop itself is model.generation.generate (prefill once, then one token per step through a
backend's KV cache; crops past the context), the one the training log's samples drive too.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

import torch

from eval.backends import Backend
from eval.cli import UsageError
from model import generation
from model.generation import OnToken


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


def crop_keep(block_size: int, keep: int | None) -> int:
    """How many recent tokens survive a crop: half the context unless the caller says otherwise."""
    keep = block_size // 2 if keep is None else keep
    if not 1 <= keep < block_size:
        raise UsageError(f"the tokens kept past the context must be in [1, {block_size}), got {keep}")
    return keep


def generate(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    on_token: OnToken | None = None,
    keep: int | None = None,
) -> list[list[int]]:
    """model.generation.generate on a backend, after the checks a user's arguments need (UsageError)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    T, ctx = max(len(p) for p in prompts), backend.block_size
    if T > ctx:
        raise UsageError(
            f"the prompt ({T} tokens) exceeds the model's context of {ctx} tokens; shorten it or keep its end"
        )
    return generation.generate(
        backend,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_ids=stop_ids,
        on_token=on_token,
        keep=crop_keep(ctx, keep),
    )


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
