"""The GPT: two block families in one file, a preallocated KV cache, pure torch.nn.

GPT-2 family: learned positions, LayerNorm, GELU MLP (Radford et al. 2019).
Modern family: RoPE, RMSNorm, SwiGLU, grouped-query attention (LLaMA, Touvron et al. 2023).
Recipe switches on either family (model/config.py cites each): QK-norm, ReLU^2 MLP, zero-initialised
output projections, logit soft-capping, document masking with optional position restarts.
Parallelism, compile and mixed precision are applied from outside (train/).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig

# kv_update(layer, k, v) -> (k_all, v_all): stores this step's keys/values and returns
# everything the queries attend to. A static cache writes in place (KVCache); the ONNX
# export concatenates past and present instead (model/onnx_export.py).
KVUpdate = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p == 0: with no dropout a decode step skips ~10 no-op calls."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim). Under torch.device("meta") (how loaders build a model to fill), its own
    N(0, 1) init is skipped: normal_ on a meta tensor imports torch._dynamo (about a third of
    eval.sample's start-up), and the values are overwritten by init_weights or the loaded weights.
    Elsewhere it is built as usual, so seeded initializations draw the same numbers as before."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim/2), float32 (Su et al. 2021, eq. 34)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    t = torch.arange(cfg.block_size, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (block_size, half)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B or 1, 1, T, D/2). Rotate-half convention (GPT-NeoX, HF LLaMA)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@functools.cache
def flex_attention(compiled: bool) -> Callable:
    """FlexAttention, compiled or not, imported on first use. Uncompiled it runs a reference path that
    materialises the scores (PyTorch's FlexAttention docs): slow, but it needs no compile (the tests);
    on CPU, compiling it took tens of seconds on first use, so only CUDA gets the compiled kernel."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False) if compiled else flex


def document_ids(idx: torch.Tensor, eot_id: int) -> torch.Tensor:
    """idx (B, T) -> (B, T) document index within the window: cumsum(idx == eot).

    <|endoftext|> opens the document it precedes (data.prepare writes it before every document,
    llm.c's layout), so it belongs to the next document, not to the one it ends: the convention of
    modded-nanogpt (`docs = (input_seq == 50256).cumsum(0)`). A token then never attends to an earlier
    document, and the EOT token sees only itself. Tokens before the window's first EOT are document 0.
    """
    return (idx == eot_id).cumsum(dim=1)  # (B, T)


def document_positions(idx: torch.Tensor, eot_id: int, start_pos: int = 0) -> torch.Tensor:
    """idx (B, T) at [start_pos, start_pos+T) -> (B, T) positions restarting at 0 at every EOT (tokens
    before the window's first EOT keep start_pos + i)."""
    B, T = idx.shape
    t = torch.arange(start_pos, start_pos + T, device=idx.device).expand(B, T)  # (B, T)
    eot, doc = idx == eot_id, document_ids(idx, eot_id)  # (B, T) each
    # starts[b, d] = position of document d's EOT (0 for document 0). A scatter and a gather, not a
    # cummax, which the ONNX exporter has no function for; index 0 receives only zeros.
    starts = torch.zeros(B, T + 1, dtype=t.dtype, device=idx.device)  # (B, T + 1)
    starts = starts.scatter(1, torch.where(eot, doc, 0), torch.where(eot, t, 0))
    return t - starts.gather(1, doc)  # (B, T)


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """doc (B, T) document ids -> boolean (B, 1, T, T) SDPA mask: causal and within one document."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()  # (T, T)
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]  # (B, 1, T, T)


def document_block_mask(doc: torch.Tensor):
    """doc (B, T) -> FlexAttention BlockMask of the same mask as document_mask (modded-nanogpt's)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (doc[b, q] == doc[b, kv])

    B, T = doc.shape
    return create_block_mask(mask_mod, B, None, T, T, device=doc.device)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        # q, k, v in one matmul; with n_kv_head == n_head this is GPT-2's c_attn exactly.
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = dropout(cfg.dropout)
        self.use_rope = cfg.family == "modern"
        if cfg.qk_norm:  # over head_dim, one gain shared by the heads (Dehghani et al. 2023; Qwen3's q_norm)
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)

    def forward(self, x, rope, layer, kv_update, attn_mask, is_causal):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim).transpose(1, 2)
        # (B, H + 2 Hkv, T, D): c_attn's output is [q heads | k heads | v heads]
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)  # (B, H|Hkv|Hkv, T, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_update is not None:
            k, v = kv_update(layer, k, v)  # (B, Hkv, S, D), S = past + T
        if attn_mask is None or isinstance(attn_mask, torch.Tensor):
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, H, T, D)
        else:  # a FlexAttention BlockMask (document masking; GPT.window)
            flex = flex_attention(compiled=q.is_cuda)
            y = flex(q, k, v, block_mask=attn_mask, enable_gqa=self.n_kv_head != self.n_head)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D): H is this rank's heads under tp
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.hidden_dim
        # SwiGLU's gate and up projections share one matmul: c_fc outputs [gate | up].
        self.c_fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = dropout(cfg.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()  # Primer's squared ReLU (So et al. 2021)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.drop(self.c_proj(h))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "modern":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, kv_update=None, attn_mask=None, is_causal=True):
        x = x + self.attn(self.ln_1(x), rope, self.layer, kv_update, attn_mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer, preallocated to max_seq_len (gpt-fast's static cache).

    Decoding T new tokens writes them at [start_pos, start_pos + T) and attends to the
    first start_pos + T entries only, so one step costs one token, not the whole context.
    `left_pad` (B,) lets prompts of different lengths share a batch: row b's first
    left_pad[b] slots are padding, masked out, and its positions start after them.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_seq_len: int | None = None,
        device=None,
        dtype=torch.float32,
        left_pad: torch.Tensor | None = None,
    ):
        self.max_seq_len = max_seq_len or cfg.block_size
        if self.max_seq_len > cfg.block_size:
            raise ValueError(f"KV cache length {self.max_seq_len} exceeds the context ({cfg.block_size})")
        shape = (batch_size, cfg.n_kv_head, self.max_seq_len, cfg.head_dim)
        # One tensor per layer, not one (L, ...) tensor: a compiled decode step then mutates its
        # inputs in place; writing into a view of a shared tensor made inductor copy the whole cache.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.left_pad = None if left_pad is None else left_pad.to(device=device, dtype=torch.long)  # (B,)

    def updater(self, start_pos: int) -> KVUpdate:
        def update(layer: int, k: torch.Tensor, v: torch.Tensor):
            stop = start_pos + k.shape[2]
            self.k[layer][:, :, start_pos:stop] = k
            self.v[layer][:, :, start_pos:stop] = v
            return self.k[layer][:, :, :stop], self.v[layer][:, :, :stop]

        return update


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        V = cfg.padded_vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=embedding(V, cfg.n_embd),
                drop=dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
                ln_f=make_norm(cfg),
            )
        )
        if cfg.family == "gpt2":
            self.transformer["wpe"] = embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if cfg.doc_mask and cfg.eot_id is None:
            raise ValueError("model.doc_mask needs model.eot_id (the tokenizer's <|endoftext|> id)")
        if cfg.family == "modern":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        if self.lm_head.weight.device.type != "meta":  # a meta model is filled later (to_empty, then
            self.init_weights()  # init_weights or a load); normal_ on meta tensors imports torch._dynamo

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2*n_layer)) (Radford et al.
        2019, sec. 2.3), zero biases, unit norms. Callable again after meta-device construction.
        With zero_init_proj the residual projections are zero instead (modded-nanogpt), so every block
        starts as the identity; their gradients are not zero (their inputs are not), so they learn."""
        std = 0.02
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                s = std / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else std
                if name.endswith("c_proj") and self.config.zero_init_proj:
                    s = 0.0
                nn.init.normal_(mod.weight, mean=0.0, std=s)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, mean=0.0, std=std)
            elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.reset_parameters()
        if self.config.family == "modern":
            cos, sin = rope_tables(self.config, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a full, bare state dict into this model, strictly: every loader (artifacts, init_from,
        resume, consolidation) goes through here. The one alias is the tied head: with tie_embeddings,
        lm_head.weight may be absent (artifacts store the table once) or equal to the token table.
        Raises ValueError naming every missing or unexpected key."""
        sd = dict(state_dict)
        tied = self.config.tie_embeddings
        if tied and "lm_head.weight" in sd:
            head, wte = sd.pop("lm_head.weight"), sd.get("transformer.wte.weight")
            if wte is not None and not torch.equal(head.to(wte.device), wte):
                raise ValueError("lm_head.weight differs from transformer.wte.weight, but the config ties them")
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(
                "the weights do not fit the model config: "
                + "; ".join(
                    f"{what} {', '.join(sorted(keys))}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected))
                    if keys
                )
            )

    # ----------------------------------------------------------------- sizes
    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters. non_embedding drops the position table, and the token table unless it
        is tied (then it is the output projection's weight, used in a matmul) -- nanoGPT's convention."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Model FLOPs of one trained token (forward + backward): 6·N + 12·L·H·Q·T, the one formula of
        MFU, train.bench and train.plan (Chowdhery et al. 2022, PaLM, appendix B; torchtitan's
        get_num_flop_per_token). Conventions (docs/benchmarks.md):
        - N: the parameters a token's matmuls use, nanoGPT's non-embedding count (the output head is
          in, the token and position tables, which are lookups, are out). Every Linear's weight costs
          2 FLOPs per token forward and 4 backward, so the widths of SwiGLU / ReLU^2 / GELU MLPs and the
          smaller K/V projections of grouped-query attention enter through N. A model whose tokens use
          only part of the weights (mixture of experts) defines num_active_params(non_embedding=True),
          the parameters one token passes through, and that count is N.
        - 12·L·H·Q·T: QK^T and AV, 2·T·Q multiply-adds per head and token each, times 3 for the
          backward. H is the query heads (GQA shares K/V heads but every query head attends). The
          full T x T square is counted, not the causal half (PaLM and torchtitan: "we follow the
          convention and do not account for sparsity in causal attention"); document masking is not
          discounted either.
        - Activation checkpointing's recomputation is not counted: these are model FLOPs (MFU), not
          hardware FLOPs (Korthikanti et al. 2022)."""
        cfg, T = self.config, seq_len or self.config.block_size
        count = getattr(self, "num_active_params", self.num_params)
        return 6 * count(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    # --------------------------------------------------------------- forward
    def positions(self, T: int, start_pos: int, kv_cache: KVCache | None, device) -> torch.Tensor:
        """(T,) positions, or (B, T) when left padding shifts each row."""
        pos = torch.arange(start_pos, start_pos + T, device=device)
        if kv_cache is not None and kv_cache.left_pad is not None:
            pos = (pos[None, :] - kv_cache.left_pad[:, None]).clamp_min(0)
        return pos

    def trunk(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor,
        kv_update: KVUpdate | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """idx (B, T) int64, pos (T,) or (B, T) -> final hidden states (B, T, C)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)  # (T, C) or (B, T, C)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D/2) or (B, T, D/2)
            if pos.dim() == 1:
                rope = (cos[None, None], sin[None, None])  # (1, 1, T, D/2)
            else:
                rope = (cos[:, None], sin[:, None])  # (B, 1, T, D/2)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_update, attn_mask, is_causal)
        return self.transformer.ln_f(x)

    def window(self, idx: torch.Tensor, start_pos: int = 0, flex: bool | None = None):
        """(pos, attn_mask, is_causal) of a forward over idx (B, T) at [start_pos, start_pos+T), no cache.

        Plain causal attention, or with doc_mask a block-diagonal causal mask from the EOT positions:
        a FlexAttention BlockMask where flex (default: on CUDA without dropout, where it is compiled and
        fast), a boolean SDPA mask otherwise. With doc_positions_restart, positions (B, T) restart at
        each EOT."""
        cfg, T = self.config, idx.shape[1]
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        if not cfg.doc_mask:
            return pos, None, True
        if cfg.doc_positions_restart:
            pos = document_positions(idx, cfg.eot_id, start_pos)  # (B, T)
        doc = document_ids(idx, cfg.eot_id)  # (B, T)
        if flex is None:
            flex = idx.is_cuda and cfg.dropout == 0
        return pos, document_block_mask(doc) if flex else document_mask(doc), False

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> logits (B, T, vocab_size); padded vocabulary rows are dropped. Every logit a
        caller sees comes from here, so soft-capping applies to the loss, sampling, evaluation and ONNX."""
        logits = self.lm_head(h)  # (B, T, padded_vocab)
        V = self.config.vocab_size
        logits = logits if logits.shape[-1] == V else logits[..., :V]
        cap = self.config.logit_softcap
        if cap is not None:  # cap * tanh(logits / cap): Gemma 2 (Team et al. 2024), modded-nanogpt
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """idx (B, T). Returns logits (B, T, vocab_size), or with targets (B, T) the mean cross
        entropy over targets != -100. With kv_cache, idx holds positions [start_pos, start_pos+T)."""
        B, T = idx.shape
        end = start_pos + T
        limit = kv_cache.max_seq_len if kv_cache is not None else self.config.block_size
        if end > limit:
            raise ValueError(f"sequence of {end} tokens exceeds the context of {limit}")
        kv_update = None
        if kv_cache is not None:  # cached decoding treats its context as one document (docs/model.md)
            pos = self.positions(T, start_pos, kv_cache, idx.device)
            kv_update = kv_cache.updater(start_pos)
            attn_mask, is_causal = cache_mask(T, start_pos, kv_cache.left_pad, idx.device)
        else:
            pos, attn_mask, is_causal = self.window(idx, start_pos)
        h = self.trunk(idx, pos, kv_update, attn_mask, is_causal)
        logits = self.head(h)  # (B, T, V)
        if targets is None:
            return logits
        # flatten(0, 1) stays a view even after the vocabulary slice, so no logits copy is kept.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def cache_mask(T: int, start_pos: int, left_pad: torch.Tensor | None, device):
    """(attn_mask, is_causal) for T queries at [start_pos, start_pos+T) over S = start_pos+T keys.

    Without padding, a prefill from 0 is plain causal and one decoded token sees every key, so
    SDPA gets no mask (and may use its fastest kernel); otherwise a boolean (B or 1, 1, T, S) mask.
    """
    S = start_pos + T
    if left_pad is None:
        if start_pos == 0:
            return None, True
        if T == 1:
            return None, False
    q_pos = torch.arange(start_pos, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if left_pad is not None:
        mask = mask & (k_pos[None, None] >= left_pad[:, None, None, None])  # (B, 1, T, S)
    return mask, False
