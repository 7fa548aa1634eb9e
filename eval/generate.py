"""The generation engine: prefill once, then one token per step through a backend's KV cache.

Prompts of different lengths share a batch by left padding (model.KVCache.left_pad): every row's
last prompt token sits in the same column, so one decode step serves all rows.
Generation goes on past the context (nanoGPT's sample.py crops and goes on): when the next token would
not fit in the cache, the most recent `keep` tokens of every row (half the context by default) are
prefilled again into a fresh cache, positions restarting at 0 -- correct for learned positions and
RoPE alike, since the model then sees exactly a prompt of `keep` tokens. In a batch the crop happens
when the padded batch (its longest row) fills the context.
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


def crop_keep(block_size: int, keep: int | None) -> int:
    """How many recent tokens survive a crop: half the context unless the caller says otherwise."""
    keep = block_size // 2 if keep is None else keep
    if not 1 <= keep < block_size:
        raise UsageError(f"the tokens kept past the context must be in [1, {block_size}), got {keep}")
    return keep


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
    keep: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (a stop token ends its row and is not included).

    Rows of a batch finish independently; the batch stops when all have, or after max_new_tokens.
    A prompt may fill the context; generation past it crops to the last `keep` tokens (see above)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, left_pad = left_pad_batch(prompts)  # (B, T), (B,)
    B, T = tokens.shape
    ctx = backend.block_size
    if T > ctx:
        raise UsageError(
            f"the prompt ({T} tokens) exceeds the model's context of {ctx} tokens; shorten it or keep its end"
        )
    keep = crop_keep(ctx, keep)
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.seed()))
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    stop = set(stop_ids)
    done = [False] * B
    logits = backend.prefill(tokens, left_pad, min(T + max_new_tokens, ctx))  # (B, V)
    length = T  # tokens in the cache (padded columns included)
    recent = tokens  # (B, <= ctx): the columns a crop keeps from; grows by one per step
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
        recent = torch.cat([recent[:, -(ctx - 1) :], nxt[:, None]], dim=1)  # cheap: at most ctx columns
        if length < ctx:
            logits = backend.decode(nxt[:, None])  # finished rows keep decoding; their tokens are dropped
            length += 1
            continue
        # The cache is full: prefill the last `keep` columns again; a row shorter than that keeps
        # part of its padding (its left_pad shrinks by the columns dropped).
        dropped = length + 1 - keep
        left_pad = (left_pad - dropped).clamp_min(0)
        left = max_new_tokens - 1 - step  # tokens still to sample, each but the last fed back
        logits = backend.prefill(recent[:, -keep:], left_pad, min(keep + left, ctx))
        length = keep
    return out


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
