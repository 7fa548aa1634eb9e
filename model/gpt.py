"""The GPT: two block families in one file, a preallocated KV cache, pure torch.nn.

GPT-2 family: learned positions, LayerNorm, GELU MLP (Radford et al. 2019).
Modern family: RoPE, RMSNorm, SwiGLU, grouped-query attention (LLaMA, Touvron et al. 2023).
Recipe switches on either family (model/config.py cites each): QK-norm, ReLU^2 MLP, zero-initialised
output projections, logit soft-capping, document masking with optional position restarts.
Parallelism, compile and mixed precision are applied from outside (train/).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.dtensor import is_dtensor
from model.moe import MoE, inactive_params, take_aux_loss

# kv_update(layer, k, v) -> (k_all, v_all): stores this step's keys/values and returns
# everything the queries attend to. A static cache writes in place (KVCache); the ONNX
# export concatenates past and present instead (model/onnx_export.py).
KVUpdate = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# sharded(idx) -> (pos, kv_update, attn_mask, is_causal) of a forward over idx (B, T_local), this rank's
# part of a window split along the sequence (context parallel, train/parallel/context.py): the tokens'
# positions in the window, a kv_update that returns the whole window's keys/values, and the mask of
# these queries against them (a boolean tensor or a FlexAttention BlockMask, as GPT.window gives).
ShardedWindow = Callable[[torch.Tensor], tuple[torch.Tensor, KVUpdate, object, bool]]


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
        if cfg.is_moe_layer(layer):  # model/moe.py; shared experts are one dense SwiGLU of their total width
            shared = cfg.n_shared_experts * cfg.expert_hidden
            self.mlp = MoE(cfg, layer, MLP(dataclasses.replace(cfg, ffn_hidden=shared)) if shared else None)
        else:
            self.mlp = MLP(cfg)

    def forward(self, x, rope=None, kv_update=None, attn_mask=None, is_causal=True):
        x = x + self.attn(self.ln_1(x), rope, self.layer, kv_update, attn_mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer, preallocated to max_seq_len (gpt-fast's static cache), and the
    per-row state that positions and masks are built from (cache_layout).

    Decoding T new tokens writes them at slots [slot, slot + T) and attends to the written slots only,
    so one step costs one token, not the whole context. `slot` (GPT.forward's start_pos) is one int for
    the whole batch, or a (B,) tensor when rows stand at different lengths (continuous batching).
    Row b's first start[b] slots are left padding (`left_pad`: prompts of different lengths sharing a
    batch), masked out; its positions count from start[b]. With doc_mask, doc_start[b] is the slot of
    the <|endoftext|> that opened the document of the row's last written token: later tokens attend
    from there on (and, with doc_positions_restart, count their positions from there), as the
    no-cache forward does (GPT.window). A `static` row state (row_state: the ONNX decoder graph, whose
    inputs keep one shape) attends over all max_seq_len slots, the unwritten ones masked.
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
        if left_pad is None:
            left_pad = torch.zeros(batch_size, dtype=torch.long)
        self.start = left_pad.to(device=device, dtype=torch.long).clone()  # (B,) first real slot of each row
        self.doc_start = self.start.clone()  # (B,) slot where the current document of each row opened
        self.padded = bool((self.start > 0).any())  # a host-side flag: the unpadded path needs no mask
        self.eot_id = cfg.eot_id if cfg.doc_mask else None
        self.restart = cfg.doc_positions_restart
        self.static = False

    @classmethod
    def row_state(
        cls, cfg: ModelConfig, max_seq_len, start: torch.Tensor, doc_start: torch.Tensor | None = None
    ) -> KVCache:
        """The row state of a static cache of max_seq_len slots, without storage: what cache_layout
        reads, for a decoder that holds its keys and values elsewhere (the ONNX graph's past inputs).
        start (B,) first real slots; doc_start (B,) where the current documents opened (default start)."""
        cache = object.__new__(cls)
        cache.max_seq_len, cache.static, cache.padded = max_seq_len, True, True
        cache.k = cache.v = []
        cache.start, cache.doc_start = start, start if doc_start is None else doc_start
        cache.eot_id = cfg.eot_id if cfg.doc_mask else None
        cache.restart = cfg.doc_positions_restart
        return cache

    @property
    def left_pad(self) -> torch.Tensor | None:
        """(B,) padding slots of each row, or None when no row is padded."""
        return self.start if self.padded else None

    def rows(self, first: int, stop: int) -> KVCache:
        """Rows [first, stop) as a cache of their own: views of the same storage and row state."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.k = [t[first:stop] for t in self.k]
        view.v = [t[first:stop] for t in self.v]
        view.start, view.doc_start = self.start[first:stop], self.doc_start[first:stop]
        return view

    def reset_row(self, row: int, left_pad: int = 0) -> None:
        """Row `row` starts a new sequence (its slots are overwritten as it is written)."""
        self.start[row] = self.doc_start[row] = left_pad
        self.padded = self.padded or left_pad > 0

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row src's first `length` slots and its state go to row dst."""
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src, :, :length]
        self.start[dst], self.doc_start[dst] = self.start[src], self.doc_start[src]

    def updater(self, slot: int | torch.Tensor, S: int) -> KVUpdate:
        """Writes a step's keys / values (B, Hkv, T, D) at slot (int, or (B,) per row) and returns the
        first S slots of every layer, what the step attends to."""
        if isinstance(slot, int):

            def update(layer: int, k: torch.Tensor, v: torch.Tensor):
                # narrow: one call each, where t[:, :, a:b] parses an index (a decode step is launch-bound)
                k_all, v_all = self.k[layer], self.v[layer]
                k_all.narrow(2, slot, k.shape[2]).copy_(k)
                v_all.narrow(2, slot, v.shape[2]).copy_(v)
                return k_all.narrow(2, 0, S), v_all.narrow(2, 0, S)

            return update
        B = slot.shape[0]
        rows = torch.arange(B, device=slot.device)[:, None]  # (B, 1)

        def update_rows(layer: int, k: torch.Tensor, v: torch.Tensor):
            # index_put_ on the whole cache tensor, as gpt-fast writes its cache: inductor keeps it in place.
            slots = slot[:, None] + torch.arange(k.shape[2], device=slot.device)  # (B, T)
            self.k[layer][rows, :, slots] = k.transpose(1, 2)  # indexed (B, T, Hkv, D)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
            return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

        return update_rows


def cache_layout(idx: torch.Tensor, slot: int | torch.Tensor, cache: KVCache):
    """(pos, attn_mask, is_causal, doc, S) of tokens idx (B, T) written at slot (int or (B,)) of cache.

    The one place positions and masks of cached decoding are built (generation, the server, the
    compiled step and the ONNX decoder): query t of row b sits at slot q = slot_b + t and attends to
    keys [doc, q], doc its document's first slot (the row's first real slot without doc_mask); a
    padding query (q < start) sees itself only, so no softmax row is empty. pos (T,) or (B, T);
    attn_mask None (plain causal / all keys) or boolean (B or 1, 1, T, S); doc (B, T) or None.
    Without padding, document masking or a static cache, a prefill from slot 0 is plain causal and
    one decoded token sees every key, so SDPA gets no mask (and may use its fastest kernel).
    """
    B, T = idx.shape
    dev = idx.device
    if cache.static:
        S = cache.max_seq_len
    elif isinstance(slot, int):
        S = slot + T
    else:
        S = int(slot.max()) + T  # a host sync, once per step: the server's per-row slots
    if isinstance(slot, int) and not cache.padded and cache.eot_id is None and not cache.static:
        pos = torch.arange(slot, S, device=dev)  # (T,)
        if slot == 0:
            return pos, None, True, None, S
        if T == 1:
            return pos, None, False, None, S
        mask = torch.arange(S, device=dev)[None, :] <= pos[:, None]  # (T, S)
        return pos, mask[None, None], False, None, S
    offs = torch.arange(T, device=dev)  # (T,)
    q = (slot[:, None] if isinstance(slot, torch.Tensor) else torch.full((B, 1), slot, device=dev)) + offs  # (B, T)
    first = cache.start[:, None].expand(B, T)  # (B, T)
    doc = first
    if cache.eot_id is not None:  # <|endoftext|> opens the document it precedes (document_ids)
        opens = torch.where((idx == cache.eot_id) & (q >= first), q, -1)  # (B, T)
        # The latest opening at or before each query: a masked max, not a cummax (the ONNX exporter
        # has no function for cummax).
        seen = torch.ones(T, T, dtype=torch.bool, device=dev).tril()  # (T query, T key)
        latest = torch.where(seen, opens[:, None, :], -1).amax(-1)  # (B, T)
        doc = torch.maximum(latest, cache.doc_start[:, None])  # (B, T)
    pos = (q - (doc if cache.restart else first)).clamp_min(0)  # (B, T); padding gets position 0
    k = torch.arange(S, device=dev)  # (S,)
    mask = ((k <= q[..., None]) & (k >= doc[..., None])) | (k == q[..., None])  # (B, T, S)
    return pos, mask[:, None], False, (doc if cache.eot_id is not None else None), S


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
            elif isinstance(mod, MoE):  # experts' w_down is a residual projection, as c_proj
                proj = 0.0 if self.config.zero_init_proj else std / math.sqrt(2 * self.config.n_layer)
                mod.init_weights(std, proj)
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
    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Unique parameters. non_embedding drops the position table, and the token table unless it
        is tied (then it is the output projection's weight, used in a matmul) -- nanoGPT's convention.
        active counts only what one token uses: of each MoE block's routed experts, k of E."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= inactive_params(self)
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
          only part of the weights (a mixture of experts runs k of its E routed experts) counts the
          parameters one token passes through: num_params(non_embedding=True, active=True).
        - 12·L·H·Q·T: QK^T and AV, 2·T·Q multiply-adds per head and token each, times 3 for the
          backward. H is the query heads (GQA shares K/V heads but every query head attends). The
          full T x T square is counted, not the causal half (PaLM and torchtitan: "we follow the
          convention and do not account for sparsity in causal attention"); document masking is not
          discounted either.
        - Activation checkpointing's recomputation is not counted: these are model FLOPs (MFU), not
          hardware FLOPs (Korthikanti et al. 2022)."""
        cfg, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True, active=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    # --------------------------------------------------------------- forward
    def trunk(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor,
        kv_update: KVUpdate | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """idx (B, T) int64, pos (T,) or (B, T) -> final hidden states (B, T, C)."""
        x, rope = self.embed(idx, pos), self.rope(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, rope, kv_update, attn_mask, is_causal)
        return self.transformer.ln_f(x)

    def embed(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64, pos (T,) or (B, T) -> the first block's input (B, T, C)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)  # (T, C) or (B, T, C)
        return self.transformer.drop(x)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE's (cos, sin) at pos (T,) or (B, T) for the blocks; None with learned positions."""
        if self.config.family != "modern":
            return None
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, D/2) or (B, T, D/2)
        if pos.dim() == 1:
            return cos[None, None], sin[None, None]  # (1, 1, T, D/2)
        return cos[:, None], sin[:, None]  # (B, 1, T, D/2)

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

    def cached_trunk(self, idx: torch.Tensor, kv_cache: KVCache, start_pos: int | torch.Tensor) -> torch.Tensor:
        """idx (B, T) written at slot start_pos (int, or (B,) per row) of kv_cache -> hidden states (B, T, C),
        the keys and values stored in the cache and its row state advanced."""
        if isinstance(start_pos, int) and start_pos + idx.shape[1] > kv_cache.max_seq_len:
            raise ValueError(
                f"sequence of {start_pos + idx.shape[1]} tokens exceeds the context of {kv_cache.max_seq_len}"
            )
        pos, attn_mask, is_causal, doc, S = cache_layout(idx, start_pos, kv_cache)
        if doc is not None:
            kv_cache.doc_start.copy_(doc[:, -1])
        return self.trunk(idx, pos, kv_cache.updater(start_pos, S), attn_mask, is_causal)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        sharded: ShardedWindow | None = None,
    ) -> torch.Tensor:
        """idx (B, T). Returns logits (B, T, vocab_size), or with targets (B, T) the mean cross
        entropy over targets != -100. With kv_cache, idx holds slots [start_pos, start_pos+T) of each
        row; start_pos is an int, or a (B,) tensor when rows stand at different slots. With sharded
        (no cache), idx is this rank's part of a longer window (see ShardedWindow). A training forward
        of a mixture of experts adds its weighted aux losses (model/moe.py) to the loss's gradient but
        not to its value: the value stays the cross entropy that runs log."""
        T = idx.shape[1]
        if kv_cache is not None:
            h = self.cached_trunk(idx, kv_cache, start_pos)
        elif sharded is not None:
            pos, kv_update, attn_mask, is_causal = sharded(idx)
            h = self.trunk(idx, pos, kv_update, attn_mask, is_causal)
        else:
            if start_pos + T > self.config.block_size:
                raise ValueError(f"sequence of {start_pos + T} tokens exceeds the context of {self.config.block_size}")
            pos, attn_mask, is_causal = self.window(idx, start_pos)
            h = self.trunk(idx, pos, None, attn_mask, is_causal)
        logits = self.head(h)  # (B, T, V)
        if targets is None:
            return logits
        loss = cross_entropy(logits, targets)
        aux = take_aux_loss(self) if self.config.n_experts else None
        if aux is None:
            return loss
        aux = aux - aux.detach()  # zero: the value stays the cross entropy exactly
        if is_dtensor(loss):  # tensor parallel's loss parallel: a replicated DTensor (a zero is)
            from torch.distributed.tensor import DTensor

            aux = DTensor.from_local(aux, loss.device_mesh, loss.placements, run_check=False)
        return loss + aux


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) -> the mean cross entropy over targets != -100 (fp32)."""
    # flatten(0, 1) stays a view even after the vocabulary slice, so no logits copy is kept.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
