"""Context parallel: a window split along the sequence over the cp ranks, attention over all of it.

The window of T tokens is cut into 2*cp equal chunks and cp rank i holds chunks i and 2*cp-1-i: under
a causal mask an early chunk attends to few keys and its mirror to many, so every rank gets the same
share of the attention work (the load-balanced sharding of Llama 3, Dubey et al. 2024, sec. 3.3.2).
Each attention layer all-gathers the keys and values of the whole window over the cp group and computes
this rank's queries against them, as Llama 3 does instead of a ring: the mask is built from the tokens'
window positions (and document ids), so causal attention, the document mask, position restarts, GQA
(only the n_kv_head heads travel), learned positions and RoPE all work, on the CPU (gloo) as on GPUs.
On CUDA the mask is a FlexAttention BlockMask (block-sparse; the kernel keeps no (T/cp, T) tensor for
the backward); elsewhere a boolean SDPA mask, which SDPA keeps per layer. The all-gather is
differentiable: its backward reduce-scatters the keys' and values' gradients to the ranks that own them.

Per rank, activations are those of T/cp tokens, except each layer's gathered keys and values
(2 * n_kv_head * head_dim * T numbers per row, short next to the queries' heads under GQA); communication
is one all-gather of the keys and values per layer in the forward and one reduce-scatter of their
gradients in the backward.

The model stays free of collectives: GPT.forward takes a `sharded` window (model/gpt.py's
ShardedWindow), and ContextParallel is one.

    cp = ContextParallel(model.config, cp_group)     # a ProcessGroup or a 1-D DeviceMesh
    loss = cp.loss(model, x, y)                      # x, y (B, T) the whole window; this rank's mean
    loss.backward()                                  # then average gradients over dp x cp
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from model.config import ModelConfig
from model.gpt import document_ids, document_positions

# The *_single names are recent torch's, the *_tensor ones (torch >= 2.3) the older; the autograd one
# reduce-scatters the gradient in the backward.
_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def chunk_order(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunks (of 2*cp_size) that cp rank cp_rank holds: i and its mirror 2*cp_size-1-i."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def shard_sequence(t: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """t (B, T, ...) -> (B, T // cp_size, ...): this rank's chunks of dim 1, in chunk_order."""
    if t.shape[1] % (2 * cp_size):  # train/parallel/dims.py's check_model tells the user first
        raise ValueError(f"cannot cut {t.shape[1]} tokens into 2 x {cp_size} equal chunks")
    chunks = t.chunk(2 * cp_size, dim=1)  # 2*cp x (B, T / (2 cp), ...)
    return torch.cat([chunks[c] for c in chunk_order(cp_rank, cp_size)], dim=1)


def sequence_positions(T: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """(T // cp_size,) int64: the window positions of the tokens shard_sequence gives this rank."""
    return shard_sequence(torch.arange(T, device=device)[None], cp_rank, cp_size)[0]


def gathered_positions(T: int, cp_size: int, device=None) -> torch.Tensor:
    """(T,) int64: the window position of each entry of a rank-major all-gather of the shards."""
    return torch.cat([sequence_positions(T, r, cp_size, device) for r in range(cp_size)])


def block_mask(q_at: torch.Tensor, k_at: torch.Tensor, doc_q: torch.Tensor | None, doc_k: torch.Tensor | None):
    """The FlexAttention BlockMask of queries at window positions q_at (T/cp,) against keys at k_at (T,):
    causal, and within one document when doc_q (B, T/cp) / doc_k (B, T) are given."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q, kv):
        return k_at[kv] <= q_at[q]

    def document(b, h, q, kv):
        return (k_at[kv] <= q_at[q]) & (doc_q[b, q] == doc_k[b, kv])

    if doc_q is None:
        return create_block_mask(causal, None, None, len(q_at), len(k_at), device=q_at.device)
    return create_block_mask(document, doc_q.shape[0], None, len(q_at), len(k_at), device=q_at.device)


class ContextParallel:
    """The sharded window of one cp group (model/gpt.py's ShardedWindow) and the sharding of the
    batches for it. Ranks of the group must call every forward together (each layer all-gathers)."""

    def __init__(self, cfg: ModelConfig, group: dist.ProcessGroup | DeviceMesh, flex: bool | None = None):
        """flex: the mask as a FlexAttention BlockMask (default: on CUDA without dropout, GPT.window's
        rule), else a boolean SDPA mask."""
        self.cfg, self.flex = cfg, flex
        self.group = group.get_group() if isinstance(group, DeviceMesh) else group
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """t (B, T, ...) -> this rank's (B, T // cp, ...)."""
        return shard_sequence(t, self.rank, self.size)

    def __call__(self, idx: torch.Tensor):
        """idx (B, T/cp), this rank's tokens -> (pos, kv_update, attn_mask, is_causal) for GPT.forward."""
        T = idx.shape[1] * self.size
        q_at = sequence_positions(T, self.rank, self.size, idx.device)  # (T/cp,) this rank's queries
        k_at = gathered_positions(T, self.size, idx.device)  # (T,) the gathered keys, rank-major
        pos, doc_q, doc_k = q_at, None, None
        if self.cfg.doc_mask:
            # Document ids and restarted positions depend on every EOT before a token, so they are
            # computed over the whole window: the token ids are all-gathered (B*T integers per forward).
            window = _gather(idx.contiguous(), 1, self.group)  # (B, T) rank-major
            window = window[:, k_at.argsort()]  # (B, T) in window order
            doc = document_ids(window, self.cfg.eot_id)  # (B, T)
            doc_q, doc_k = doc[:, q_at], doc[:, k_at]  # (B, T/cp), (B, T)
            if self.cfg.doc_positions_restart:
                pos = document_positions(window, self.cfg.eot_id)[:, q_at]  # (B, T/cp)
        flex = self.flex if self.flex is not None else idx.is_cuda and self.cfg.dropout == 0
        if flex:  # block-sparse: nothing of size (T/cp) x T is kept for the backward
            return pos, self.gather_kv, block_mask(q_at, k_at, doc_q, doc_k), False
        mask = k_at[None, :] <= q_at[:, None]  # (T/cp, T) causal
        if doc_q is None:
            return pos, self.gather_kv, mask[None, None], False  # (1, 1, T/cp, T)
        mask = mask & (doc_q[:, :, None] == doc_k[:, None, :])  # (B, T/cp, T)
        return pos, self.gather_kv, mask[:, None], False  # (B, 1, T/cp, T)

    def gather_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, T/cp, D) -> the window's (B, Hkv, T, D) each, rank-major: one all-gather."""
        kv = _gather_autograd(torch.cat([k, v], dim=1), 2, self.group)  # (B, 2 Hkv, T, D)
        return kv.split(k.shape[1], dim=1)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, T), the whole window -> the mean loss over this rank's T/cp tokens (differentiable).
        Every rank holds T/cp tokens, so the mean of these over the group is the window's mean loss."""
        return model(self.shard(x), self.shard(y), sharded=self)


class ContextParallelEval(nn.Module):
    """A model whose loss forward runs context parallel and returns the whole window's mean loss on
    every cp rank (model/loss.py's mean_loss reads it as the model's); any other forward (logits,
    a KV cache) runs the whole window on each rank. For evaluation: no gradient flows across ranks."""

    def __init__(self, model: nn.Module, cp: ContextParallel):
        super().__init__()
        self.model, self.cp = model, cp

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if targets is None or kwargs:
            return self.model(idx, targets, **kwargs)
        with torch.no_grad():
            loss = self.cp.loss(self.model, idx, targets)  # mean over this rank's scored tokens
            n = (self.cp.shard(targets) != -100).sum()
            local = torch.where(n > 0, loss.double() * n, 0.0)  # a rank with no scored token adds 0
            sums = torch.stack([local, n.double()])  # (2,)
            dist.all_reduce(sums, group=self.cp.group)
        return (sums[0] / sums[1]).to(loss.dtype)
