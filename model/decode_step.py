"""One decoded token per row through a GPT and its KVCache, with the per-call overhead stripped.

At batch 1 on a small model a decode step is launch-bound: a few MiB of weights, but ~60 ATen calls
plus ~50 nn.Module calls, each costing microseconds of Python and dispatch. GPT.forward is written for
every case (training, prefill, padding); this step is written for one: T = 1, eval mode. It computes
what GPT.forward(tokens, kv_cache=cache, start_pos=pos) computes, with
  - the residual stream kept 2-D (B, C), so no view / transpose / reshape of it per layer;
  - every nn.Linear as one addmm (mm) on a weight transposed once here, not F.linear's linear + t + addmm;
  - keys and values written into the preallocated cache in place, read back as views;
  - positions, RoPE rows and the padding mask sliced from tables built once per cache, not rebuilt.
  - norms and lookups as their torch builtins on the modules' parameters (no module frames).
Int8 layers on another kernel than "float" are called as they are; RoPE (apply_rope), ln_f and the
head are the model's own.

Only the blocks this file knows are run here: `supports` turns down a model with another block, a
module in training mode, or a config switch it does not know set away from its default; the caller
then goes through GPT.forward. tests/test_generate.py checks it against GPT.forward, both families.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.gpt import GPT, MLP, Attention, Block, KVCache, apply_rope
from model.quantize import Int8Linear

# The config fields this step implements; any other field must be at its default for the step to run.
KNOWN = {
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
    "dropout",
    "pad_vocab_multiple",
    "rope_theta",
    "norm_eps",
    "extra",
    "mlp",  # gelu, swiglu or relu2, as model.gpt.MLP
    "qk_norm",
    "logit_softcap",  # inside GPT.head, which the step calls
    "zero_init_proj",  # initialisation only
    # Cached decoding treats its context as one document (GPT.forward with a cache: docs/model.md).
    "doc_mask",
    "doc_positions_restart",
    "eot_id",
}
NORMS = (nn.LayerNorm, nn.RMSNorm)


def unknown_switches(cfg: ModelConfig) -> list[str]:
    """The config fields set away from their defaults that this step does not implement."""
    return [
        f.name
        for f in dataclasses.fields(cfg)
        if f.name not in KNOWN and f.default is not dataclasses.MISSING and getattr(cfg, f.name) != f.default
    ]


def supports(model: nn.Module) -> bool:
    """Whether DecodeStep computes exactly what this model's forward does."""
    if type(model) is not GPT or model.training or unknown_switches(model.config):
        return False
    if "wpe" in model.transformer and type(model.transformer.wpe) is not nn.Embedding:
        return False
    return all(
        type(b) is Block
        and type(b.attn) is Attention
        and type(b.mlp) is MLP
        and type(b.ln_1) in NORMS
        and type(b.ln_2) in NORMS
        and isinstance(b.attn.resid_drop, nn.Identity)
        and isinstance(b.mlp.drop, nn.Identity)
        for b in model.transformer.h
    )


def lookup(mod: nn.Module):
    """ids (B,) -> rows (B, C): torch.embedding on a plain nn.Embedding's table, else the module (int8 tables)."""
    if type(mod) is not nn.Embedding:
        return mod
    w = mod.weight
    return lambda ids: torch.embedding(w, ids)


def norm(mod: nn.Module):
    """x (B, C) -> (B, C): the LayerNorm / RMSNorm module's own function, called without the module and
    functional wrappers (three Python frames per call)."""
    shape, w, eps = mod.normalized_shape, mod.weight, mod.eps
    if type(mod) is nn.LayerNorm:
        b = mod.bias
        return lambda x: torch.layer_norm(x, shape, w, b, eps)
    return lambda x: torch.rms_norm(x, shape, w, eps)


def matmul(mod: nn.Module):
    """x (B, in) -> (B, out): one addmm / mm for a plain nn.Linear (its weight transposed once, a view)
    and for an int8 layer whose decode kernel is "float" (its dequantized fp32 weight; the activations
    of the int8 backend are fp32), else the module itself (the other int8 kernels)."""
    if type(mod) is nn.Linear:
        w = mod.weight
    elif type(mod) is Int8Linear and mod.kernel == "float":
        if mod._float is None:  # built on a layer's first float call (tune_kernels times one per shape)
            mod.run("float", mod.scale.new_zeros(1, mod.in_features))
        w = mod._float  # (out, in) float32
    else:
        return mod
    w_t, b = w.t(), mod.bias  # (in, out) view of the (out, in) weight
    if b is None:
        return lambda x: torch.mm(x, w_t)
    return lambda x: torch.addmm(b, x, w_t)


class DecodeStep:
    """step(tokens (B, 1), cache, pos) -> logits (B, vocab_size), for a model `supports` accepts.

    Built once per model (it holds views of the weights: build it after any change of dtype, device or
    layout). Tables that depend on the cache (positions and mask under left padding) are built on
    the first step with a new cache."""

    def __init__(self, model: GPT):
        if not supports(model):
            raise ValueError("DecodeStep does not implement this model; decode through GPT.forward")
        cfg = model.config
        self.model = model
        self.H, self.Hkv, self.D, self.C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd
        self.rope = cfg.family == "modern"
        self.mlp = cfg.mlp  # gelu | swiglu | relu2 (model.gpt.MLP)
        self.wte = lookup(model.transformer.wte)
        self.wpe = None if self.rope else model.transformer.wpe
        self.layers = [
            (
                norm(b.ln_1),
                matmul(b.attn.c_attn),
                matmul(b.attn.c_proj),
                norm(b.ln_2),
                matmul(b.mlp.c_fc),
                matmul(b.mlp.c_proj),
                (norm(b.attn.q_norm), norm(b.attn.k_norm)) if cfg.qk_norm else None,
            )
            for b in model.transformer.h
        ]
        self._cache: KVCache | None = None

    def _tables(self, cache: KVCache) -> None:
        """Per-cache tables: row positions (B, S_max) and the key mask (B, 1, 1, S_max) under left padding."""
        self._cache = cache
        self.pos_table = self.mask = None
        if cache.left_pad is not None:
            slots = torch.arange(cache.max_seq_len, device=cache.left_pad.device)  # (S_max,)
            self.pos_table = (slots[None, :] - cache.left_pad[:, None]).clamp_min(0)  # (B, S_max)
            self.mask = (slots[None, :] >= cache.left_pad[:, None])[:, None, None, :]  # (B, 1, 1, S_max)

    def __call__(self, tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        if pos >= cache.max_seq_len:
            raise ValueError(f"sequence of {pos + 1} tokens exceeds the context of {cache.max_seq_len}")
        if cache is not self._cache:
            self._tables(cache)
        B, H, Hkv, D, C = tokens.shape[0], self.H, self.Hkv, self.D, self.C
        S = pos + 1  # keys attended to: the cache so far and this token
        x = self.wte(tokens.view(B))  # (B, C)
        rows = None if self.pos_table is None else self.pos_table[:, pos]  # (B,) positions under padding
        if self.rope:
            m = self.model
            if rows is None:
                cos, sin = m.rope_cos[pos], m.rope_sin[pos]  # (D/2,), broadcast over (B, H, 1, D/2)
            else:
                cos, sin = m.rope_cos[rows].view(B, 1, 1, -1), m.rope_sin[rows].view(B, 1, 1, -1)
        else:
            x = x + (self.wpe.weight[pos] if rows is None else self.wpe(rows))  # (B, C)
        mask = None if self.mask is None else self.mask[..., :S]  # (B, 1, 1, S)
        gqa = Hkv != H
        for layer, (ln_1, c_attn, a_proj, ln_2, c_fc, m_proj, qk_norm) in enumerate(self.layers):
            # c_attn's output is [q heads | k heads | v heads]; with T = 1, (B, N*D) is (B, N, 1, D) as is.
            qkv = c_attn(ln_1(x)).view(B, H + 2 * Hkv, 1, D)
            q, k, v = qkv.split([H, Hkv, Hkv], dim=1)  # (B, H|Hkv|Hkv, 1, D)
            if qk_norm is not None:  # over head_dim, before RoPE, as model.gpt.Attention
                q, k = qk_norm[0](q), qk_norm[1](k)
            if self.rope:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_all, v_all = cache.k[layer], cache.v[layer]  # (B, Hkv, S_max, D)
            k_all.narrow(2, pos, 1).copy_(k)  # narrow: one call, where k_all[:, :, pos] parses an index
            v_all.narrow(2, pos, 1).copy_(v)
            y = F.scaled_dot_product_attention(
                q, k_all.narrow(2, 0, S), v_all.narrow(2, 0, S), attn_mask=mask, enable_gqa=gqa
            )  # (B, H, 1, D)
            x = x + a_proj(y.view(B, C))
            h = c_fc(ln_2(x))  # (B, hidden) or (B, 2 hidden) = [gate | up]
            if self.mlp == "swiglu":
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            elif self.mlp == "relu2":
                h = F.relu(h).square()  # as model.gpt.MLP
            else:
                h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new", as model.gpt.MLP
            x = x + m_proj(h)
        return self.model.head(self.model.transformer.ln_f(x))  # (B, vocab_size)
