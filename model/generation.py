"""The one generation loop: prefill once, then one token per step through a KV cache, sampled by the
one rule (model/sampling.py). The training log's samples (train/sample.py), eval.sample and eval.bench
(eval/generate.py, through a backend) drive `generate`; the server's engine (eval/serve/batching.py)
drives the same step: `decode_next` (one batched decode step over the running rows, each row's next
token by its Sampling) after `prefill_row` (one prompt into a free row of the decoder's cache).

Prompts of different lengths share a batch by left padding (KVCache's left_pad): every row's last
prompt token sits in the same slot, so one decode step serves all rows.
Generation goes on past the context (nanoGPT's sample.py crops and goes on): when the next token would
not fit in the cache, the most recent `keep` tokens of every row (half the context by default) are
prefilled again into a fresh cache, positions restarting at 0 -- correct for learned positions and
RoPE alike, since the model then sees exactly a prompt of `keep` tokens. In a batch the crop happens
when the padded batch (its longest row) fills the context.
Draws come from one torch.Generator seeded by the caller, so the same seed and decoder give the same
tokens, and sampling never moves the global RNG (a training run's exact resume depends on it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.errors import UserError
from model.gpt import GPT, KVCache
from model.sampling import sample_next

# The ModelConfig fields cached decoding handles: GPT.forward with a KVCache, cache_layout, the compiled
# step, the server's engine, and the ONNX decoder graph (GPT.trunk and GPT.head on cache_layout).
# Decoding runs the model's own blocks, so a field that changes the block is handled by construction;
# a field that changes which tokens a query sees or at which position (doc_mask,
# doc_positions_restart, eot_id) needs cache_layout to know it.
# tests/test_generate.py fails when ModelConfig gains a field that is not listed here.
HANDLED_FIELDS = frozenset(
    {
        "vocab_size",
        "block_size",
        "n_layer",
        "n_head",
        "n_kv_head",
        "n_embd",
        "family",
        "ffn_hidden",
        "bias",
        "tie_embeddings",
        "dropout",  # eval mode: off
        "pad_vocab_multiple",  # GPT.head drops the padded rows
        "rope_theta",
        "norm_eps",
        "mlp",
        "qk_norm",
        "zero_init_proj",  # initialisation only
        "logit_softcap",  # GPT.head
        "doc_mask",  # cache_layout: KVCache.doc_start
        "doc_positions_restart",  # cache_layout
        "eot_id",  # cache_layout
        # mixture of experts (model/moe.py): the block's MLP, the same in every forward; the routing
        # bias is a buffer of the block
        "n_experts",
        "moe_top_k",
        "n_shared_experts",
        "moe_every",
        "moe_first_dense",
        "moe_hidden",
        "moe_router",
        "moe_norm_topk",
        "moe_route_scale",
        "moe_aux_loss_coef",  # training only: no aux loss in eval mode
        "moe_z_loss_coef",  # training only
        "moe_bias_update_rate",  # training only (after each optimizer step)
        "moe_grouped_mm",
        "extra",
    }
)

# on_token(row, token) -> True to finish that row (a stop string seen in its text), else None / False.
OnToken = Callable[[int, int], bool | None]


class Decoder(Protocol):
    """What the loop drives: a model and its cache (CachedDecoder), or an ONNX Runtime session."""

    block_size: int

    def prefill(self, tokens: torch.Tensor, left_pad: torch.Tensor, max_len: int) -> torch.Tensor:
        """tokens (B, T) int64, left_pad (B,) -> logits of the last position (B, V); room for max_len."""
        ...

    def decode(self, tokens: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (n, 1) int64, the next token of rows [0, n) -> logits (n, V). slot (n,): the cache slot
        of each row (continuous batching); None: every row at the batch's next slot."""
        ...


class RowDecoder(Decoder, Protocol):
    """A Decoder whose rows are sequences that come and go (the server's continuous batching): rows
    [0, n) run, each at its own slot; a leaving row's place goes to the last row, so rows stay packed."""

    vocab_size: int

    def open_rows(self, rows: int) -> None:
        """Room for `rows` sequences of the full context."""
        ...

    def prefill_row(self, row: int, prompt: Sequence[int], all_positions: bool) -> torch.Tensor:
        """One prompt alone into row `row` (the first free one) -> float logits (T, V), or (1, V) of the
        last position unless all_positions."""
        ...

    def drop_row(self, row: int, lengths: Sequence[int]) -> None:
        """Row `row` leaves; the last row, of lengths[-1] written slots, takes its place (lengths: each
        running row's written slots, before the drop)."""
        ...


@dataclass
class Sampling:
    """One rule's settings and the generator its draws come from (model/sampling.py)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    @classmethod
    def seeded(cls, temperature: float, top_k: int | None, top_p: float | None, seed: int | None) -> Sampling:
        """A generator seeded with `seed` (a fresh random seed when None); greedy decoding draws nothing."""
        gen = None
        if temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(seed if seed is not None else int(torch.seed()))
        return cls(temperature, top_k, top_p, gen)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> next tokens (B,)."""
        return sample_next(logits, self.temperature, self.top_k, self.top_p, self.generator)


def choose(logits: torch.Tensor, rules: Sampling | Sequence[Sampling]) -> torch.Tensor:
    """logits (n, V) -> next tokens (n,): one rule for every row (one draw over the batch), or one per row."""
    if isinstance(rules, Sampling):
        return rules(logits)
    return torch.cat([rule(logits[i : i + 1]) for i, rule in enumerate(rules)])


def decode_next(
    decoder: Decoder, tokens: torch.Tensor, rules: Sampling | Sequence[Sampling], slot: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one decode step: feed tokens (n,) of rows [0, n) (at slot (n,) each, or the batch's next
    slot) and choose each row's next token -> (next tokens (n,), float logits (n, V) on the CPU)."""
    logits = decoder.decode(tokens[:, None], slot).cpu()
    return choose(logits, rules), logits


def decode_step(model: GPT, tokens: torch.Tensor, slot: int | torch.Tensor, cache: KVCache) -> torch.Tensor:
    """tokens (B, 1) at slot (an int, or (B,) per row) of cache -> logits (B, V): GPT's cached forward,
    the head on the one position. CachedDecoder(compile=True) runs it through torch.compile with
    dynamic shapes (the attended length changes every step)."""
    return model.head(model.cached_trunk(tokens, cache, slot))[:, -1]


class CachedDecoder:
    """A GPT and its preallocated KVCache behind the Decoder interface (gpt-fast's design).

    compile: one-token steps go through torch.compile(decode_step) with dynamic shapes: one graph
    serves every cache length, and a step attends over the written slots only, as the eager step does
    (a static cache would attend over all of its slots, masked: several times the attention work
    early in a sequence).
    inference_mode: steps run under torch.inference_mode (a little less per-op bookkeeping than
    no_grad); False for a model that trains afterwards (the training log's samples): tensors made in
    inference mode, such as FSDP's gathered parameters or torchao's float8 weight wrappers, cannot
    enter autograd later, and some tensor subclasses refuse to be made in it at all.
    dtype: the keys' and values' dtype, the one the blocks compute in (default: the parameters'; a
    layout that casts its parameters for the forward, FSDP's mixed precision, says its compute dtype)."""

    def __init__(
        self,
        model: GPT,
        compile: bool = False,
        device: torch.device | str | None = None,
        inference_mode: bool = True,
        dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.grad_mode = torch.inference_mode if inference_mode else torch.no_grad
        cfg = model.config
        self.vocab_size, self.block_size = cfg.vocab_size, cfg.block_size
        p = next(iter(model.parameters()), None)
        if device is None:
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        # int8 models keep their weights in buffers; their few float parameters, activations and cache are fp32.
        self.dtype = dtype or (p.dtype if p is not None and p.is_floating_point() else torch.float32)
        self.cache: KVCache | None = None
        self.rows_total = 0  # the cache's rows
        self.pos = 0  # the slot the next token is written at (generate's batch: every row at once)
        self._step = None
        if compile:
            # The model is this decoder's for its lifetime (eval mode, weights laid out before the first
            # step), so Dynamo need not re-check its modules' attributes on every call: those guards
            # are a large part of a small model's compiled step. Guards on the arguments' tensors and
            # on the cache's row state stay.
            guards = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            self._step = torch.compile(decode_step, dynamic=True, options={"guard_filter_fn": guards})

    def prefill(self, tokens: torch.Tensor, left_pad: torch.Tensor, max_len: int) -> torch.Tensor:
        B, T = tokens.shape
        with self.grad_mode():
            self.cache = KVCache(self.model.config, B, max_len, self.device, self.dtype, left_pad=left_pad)
        self.rows_total = B
        self.pos = T
        return self._prefill(tokens, self.cache, False)[:, -1]

    def _prefill(self, tokens: torch.Tensor, cache: KVCache, all_positions: bool) -> torch.Tensor:
        """tokens (B, T) from slot 0 of cache -> float logits (B, T, V), or (B, 1, V) of the last position."""
        with self.grad_mode():
            h = self.model.cached_trunk(tokens.to(self.device), cache, 0)  # (B, T, C)
            return self.model.head(h if all_positions else h[:, -1:]).float()  # the head on what is asked only

    def decode(self, tokens: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        n = tokens.shape[0]
        cache = self.cache if n == self.rows_total else self.cache.rows(0, n)
        at: int | torch.Tensor = self.pos if slot is None else slot.to(self.device)
        if slot is None:
            self.pos += 1
        with self.grad_mode():
            return (self._step or decode_step)(self.model, tokens, at, cache).float()

    def open_rows(self, rows: int) -> None:
        self.cache = KVCache(self.model.config, rows, self.block_size, self.device, self.dtype)
        self.rows_total = rows

    def prefill_row(self, row: int, prompt: Sequence[int], all_positions: bool = False) -> torch.Tensor:
        cache = self.cache.rows(row, row + 1)
        cache.reset_row(0)
        return self._prefill(torch.tensor([list(prompt)]), cache, all_positions)[0]

    def drop_row(self, row: int, lengths: Sequence[int]) -> None:
        last = len(lengths) - 1
        if row != last:
            self.cache.move_row(last, row, lengths[last])


class WindowDecoder:
    """A Decoder without a cache: every step runs the whole window through `model(idx) -> logits`
    (nanoGPT's sample loop), right-padded to a multiple of `multiple` tokens.

    For a model that cannot take one token at a time: under sequence parallel (tensor parallel's
    norms and residuals), each of the tp ranks holds a slice of the window's positions, so a window
    must split evenly over them. Causal attention keeps the padding after the last real token out of
    every real position's logits. Prompts are not left-padded (one row, or rows of equal length)."""

    def __init__(self, model: nn.Module, block_size: int, multiple: int = 1):
        self.model, self.multiple = model, multiple
        self.block_size = block_size - block_size % multiple  # padded windows must fit the context
        self.window: torch.Tensor | None = None  # (B, T) the tokens so far
        self.device = next(iter(model.parameters())).device

    @torch.no_grad()  # not inference mode: DTensor collectives run inside
    def prefill(self, tokens: torch.Tensor, left_pad: torch.Tensor, max_len: int) -> torch.Tensor:
        if bool(left_pad.any()):
            raise ValueError("WindowDecoder takes prompts of equal length (no left padding)")
        self.window = tokens.to(self.device)
        return self._last()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
        self.window = torch.cat([self.window, tokens.to(self.device)], dim=1)  # (B, T + 1)
        return self._last()

    def _last(self) -> torch.Tensor:
        """Float logits (B, V) of the window's last token."""
        B, T = self.window.shape
        pad = -T % self.multiple
        idx = F.pad(self.window, (0, pad)) if pad else self.window  # (B, T + pad): token 0 after the end
        return self.model(idx)[:, T - 1].float()


def left_pad_batch(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens (B, T) left-padded with pad_id, left_pad (B,))."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    return tokens, torch.tensor([T - len(p) for p in prompts], dtype=torch.long)


class GenerationError(UserError, ValueError):
    """Arguments a user gave that generation cannot run with; the message says what to change."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise GenerationError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"--top-p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise GenerationError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate(
    decoder: Decoder,
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
    A prompt may fill the context; generation past it crops to the last `keep` tokens (half the
    context by default; see the module docstring). Arguments a user can get wrong raise GenerationError."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, left_pad = left_pad_batch(prompts)  # (B, T), (B,)
    B, T = tokens.shape
    ctx = decoder.block_size
    if T > ctx:
        raise GenerationError(
            f"the prompt ({T} tokens) exceeds the model's context of {ctx} tokens; shorten it or keep its end"
        )
    keep = ctx // 2 if keep is None else keep
    if not 1 <= keep < ctx:
        raise GenerationError(f"the tokens kept past the context must be in [1, {ctx}), got {keep}")
    rule = Sampling.seeded(temperature, top_k, top_p, seed)  # one generator: the batch's draws in one call
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    stop = set(stop_ids)
    done = [False] * B
    nxt = choose(decoder.prefill(tokens, left_pad, min(T + max_new_tokens, ctx)).cpu(), rule)  # (B,)
    length = T  # tokens in the cache (padded columns included)
    recent = tokens  # (B, <= ctx): the columns a crop keeps from; grows by one per step
    for step in range(max_new_tokens):
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
            nxt, _ = decode_next(decoder, nxt, rule)  # finished rows keep decoding; their tokens are dropped
            length += 1
            continue
        # The cache is full: prefill the last `keep` columns again; a row shorter than that keeps
        # part of its padding (its left_pad shrinks by the columns dropped).
        dropped = length + 1 - keep
        left_pad = (left_pad - dropped).clamp_min(0)
        left = max_new_tokens - 1 - step  # tokens still to sample, each but the last fed back
        nxt = choose(decoder.prefill(recent[:, -keep:], left_pad, min(keep + left, ctx)).cpu(), rule)
        length = keep
    return out
