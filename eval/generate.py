"""The generation engine: prefill once, then one token per step through a backend's KV cache.

Prompts of different lengths share a batch by left padding (model.KVCache.left_pad): every row's
last prompt token sits in the same column, so one decode step serves all rows.
Sampling is model.sampling.sample_next (temperature, top-k, top-p; 0 = greedy), the rule the training
log's samples use too. Draws come from one torch.Generator seeded by the caller, so the same seed and
backend give the same text.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

import torch

from eval.backends import Backend
from eval.cli import UsageError
from model.sampling import sample_next

# on_token(row, token) -> True to finish that row (a stop string seen in its text), else None / False.
OnToken = Callable[[int, int], bool | None]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


def left_pad_batch(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens (B, T) left-padded with pad_id, left_pad (B,))."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    return tokens, torch.tensor([T - len(p) for p in prompts], dtype=torch.long)


@torch.no_grad()
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
) -> list[list[int]]:
    """The new tokens of each prompt (a stop token ends its row and is not included).

    Rows of a batch finish independently; the batch stops when all have, or after max_new_tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, left_pad = left_pad_batch(prompts)  # (B, T), (B,)
    B, T = tokens.shape
    if T + max_new_tokens > backend.block_size:
        raise UsageError(
            f"prompt ({T} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the model's context "
            f"of {backend.block_size} tokens; ask for fewer new tokens or a shorter prompt"
        )
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.seed()))
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    stop = set(stop_ids)
    done = [False] * B
    logits = backend.prefill(tokens, left_pad, T + max_new_tokens)  # (B, V)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (B,)
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if tok in stop:
                done[b] = True
                continue
            out[b].append(tok)
            if on_token is not None and on_token(b, tok):
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        logits = backend.decode(nxt[:, None])  # finished rows keep decoding; their tokens are dropped
    return out


@torch.no_grad()
def generate_no_cache(
    forward: Callable[[torch.Tensor], torch.Tensor], prompt: Sequence[int], max_new_tokens: int, block_size: int
) -> list[int]:
    """Greedy decoding that re-runs the whole context every step (nanoGPT's `generate`): the reference
    the KV-cache engine must match token for token, and the baseline of the bench's speed-up."""
    idx = torch.tensor([list(prompt)], dtype=torch.long)  # (1, T)
    for _ in range(max_new_tokens):
        logits = forward(idx[:, -block_size:])[:, -1]  # (1, V)
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
