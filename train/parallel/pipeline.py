"""Pipeline parallel: the GPT's blocks split into stages across the "pp" ranks, run by a schedule of
torch.distributed.pipelining (Huang et al. 2019, GPipe; Narayanan et al. 2021, 1F1B and its interleaved
form), the way torchtitan's pipeline_parallel.py does it.

    stages = split_stages(model, pp_rank, pp_size, stages_per_rank)   # each through parallelize()
    local = merge_stages(stages)              # what the optimizer and the checkpoints see
    schedule = build_schedule(stages, pp_group, n_microbatches, "1F1B", device)
    loss = pipeline_step(schedule, micro_batches, pp_group)   # forward + backward of every micro-batch
    sync_tied_grads(stages, pp_group)         # a tied head: the two copies' gradients summed
    view = PipelineModel(stages, pp_group)    # forward-only GPT for evaluation, sampling, HellaSwag

Stage s of S = pp_size * stages_per_rank holds an even share of the blocks; the first also holds the
embeddings, the last the final norm and the head, and computes the loss. Stage s lives on pp rank
s % pp_size (torchtitan's "loop" order: interleaved 1F1B gives rank r the stages r, r + pp, ...).
Every stage keeps the bare model's parameter names (transformer.h.<i>... with the block's global
index), so DCP checkpoints of a pipelined run load into any other layout and back.

Tied embeddings (GPT-2's head is the token table) follow Megatron-LM's embedding group: the last stage
holds a copy of the table under its bare name (transformer.wte, the head's weight), so optimizer groups and
checkpoints see one parameter of one name on every layout; after each step's backward the first and last
pp ranks add each other's gradient of it (sync_tied_grads), so both copies take the same step, and the
gradient norm counts it once (clip_grad_norm_).

Every pp rank gets the same micro-batches (the loader's rank is the data-parallel one): the first stage
reads the ids, every stage reads them again for positions and the document mask, the last the targets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from model.gpt import GPT, cross_entropy
from train.parallel.dims import check_split

SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}


def check_schedule(schedule: str, pp: int, stages_per_rank: int, n_microbatches: int) -> None:
    """Raise ValueError (one line that says what to change) for a schedule torch's cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    if schedule == "1F1B" and stages_per_rank != 1:
        raise ValueError("parallel.pp_schedule=1F1B runs one stage per rank: set parallel.pp_stages_per_rank=1")
    if schedule == "Interleaved1F1B" and stages_per_rank < 2:
        raise ValueError("parallel.pp_schedule=Interleaved1F1B needs parallel.pp_stages_per_rank >= 2")
    # 1F1B keeps a micro-batch in flight per stage (Schedule1F1B.__init__); interleaved 1F1B runs
    # rounds of pp micro-batches (ScheduleInterleaved1F1B.__init__)
    if n_microbatches < pp or (stages_per_rank > 1 and n_microbatches % pp):
        raise ValueError(
            f"train.grad_accum_steps={n_microbatches} (the pipeline's micro-batches) must be a multiple "
            f"of parallel.pp={pp}"
        )


def stage_blocks(n_layer: int, n_stages: int, stage: int) -> range:
    """The blocks of one stage: an even split, the first n_layer % n_stages stages one block more."""
    base, extra = divmod(n_layer, n_stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def stage_indices(pp_rank: int, pp_size: int, stages_per_rank: int) -> list[int]:
    """The stages of one pp rank, in torchtitan's loop order: r, r + pp, r + 2 pp, ..."""
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


class StageBlocks(nn.ModuleDict):
    """A stage's blocks keyed by their global index, so parameter names stay `transformer.h.<i>...`;
    iterates over the blocks and indexes them by position, as the nn.ModuleList it stands for does
    (activation checkpointing, per-block compile, FSDP and tensor parallel walk `model.transformer.h`)."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, key: str | int) -> nn.Module:
        """A global index's block by its name ("2"); by an int, the stage's n-th block, as in a list."""
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)


class StageModel(GPT):
    """Some of a GPT's modules (the same objects, under the same names): blocks, plus the embeddings
    when `first`, the final norm and the head when `last`. GPT's methods that need only what a stage
    holds (window, embed, rope, head, init_weights) work on it; trunk runs this stage's share."""

    def __init__(self, model: GPT, blocks: Iterable[int], first: bool, last: bool, stage_index: int | None = None):
        nn.Module.__init__(self)  # not GPT.__init__: the modules come from `model`, not built again
        self.config, self.is_first, self.is_last, self.stage_index = model.config, first, last, stage_index
        self.sharded = None  # context parallel's window (train/parallel/context.py), when cp > 1
        parts = {"wte", "drop", "wpe"} if first else set()
        parts |= {"ln_f"} if last else set()
        if last and model.config.tie_embeddings:  # the head's weight, under the token table's (bare) name
            parts.add("wte")
        self.transformer = nn.ModuleDict({k: m for k, m in model.transformer.items() if k in parts})
        self.transformer["h"] = StageBlocks({str(i): model.transformer.h[i] for i in sorted(blocks)})
        self.lm_head = model.lm_head if last else None
        if hasattr(model, "rope_cos"):  # every stage rotates its own queries and keys
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def trunk(self, x, pos, kv_update=None, attn_mask=None, is_causal=True):
        """This stage's share of GPT.trunk: x is the ids (B, T) on the first stage, the previous stage's
        output (B, T, C) elsewhere; returns (B, T, C), after the final norm on the last stage."""
        if self.is_first:
            x = self.embed(x, pos)  # (B, T, C)
        rope = self.rope(pos)
        for block in self.transformer.h:
            x = block(x, rope, kv_update, attn_mask, is_causal)
        return self.transformer.ln_f(x) if self.is_last else x

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None, **window) -> torch.Tensor:
        """x as in trunk. The schedule passes tokens (B, T), the micro-batch's ids, which give positions
        and the document mask (under context parallel this cp rank's (B, T / cp) and the sharded window);
        PipelineModel passes trunk's pos / kv_update / attn_mask / is_causal (the whole window).
        Returns logits (B, T, V) on the last stage, else (B, T, C). Through __call__, so that FSDP
        gathers the parameters its root holds (embeddings, final norm, head)."""
        if tokens is not None and self.sharded is not None:  # tokens: this cp rank's (B, T / cp)
            pos, kv_update, attn_mask, is_causal = self.sharded(tokens)  # kv_update all-gathers K and V
            window = {"pos": pos, "kv_update": kv_update, "attn_mask": attn_mask, "is_causal": is_causal}
        elif tokens is not None:
            pos, attn_mask, is_causal = self.window(tokens)
            window = {"pos": pos, "attn_mask": attn_mask, "is_causal": is_causal}
        h = self.trunk(x, **window)
        return self.head(h) if self.is_last else h


def split_stages(model: GPT, pp_rank: int, pp_size: int, stages_per_rank: int = 1) -> list[StageModel]:
    """This pp rank's stages of `model` (its module objects: the rest is freed with the model).
    Raises ValueError for fewer blocks than stages (check_split's line)."""
    cfg, n_stages = model.config, pp_size * stages_per_rank
    check_split(cfg.n_layer, pp_size, stages_per_rank)
    return [
        StageModel(model, stage_blocks(cfg.n_layer, n_stages, s), s == 0, s == n_stages - 1, stage_index=s)
        for s in stage_indices(pp_rank, pp_size, stages_per_rank)
    ]


def merge_stages(stages: list[StageModel]) -> StageModel:
    """One module over a rank's stages (the same parameters, the bare model's names, the bare model's
    order): what the optimizer is built over and what checkpoints save and load. Not callable when its
    blocks are not contiguous (interleaved stages)."""
    if len(stages) == 1:
        return stages[0]
    merged = StageModel.__new__(StageModel)
    nn.Module.__init__(merged)
    first, last = stages[0].is_first, stages[-1].is_last
    merged.config, merged.is_first, merged.is_last, merged.stage_index = stages[0].config, first, last, None
    modules = {k: m for s in stages for k, m in s.transformer.items() if k != "h"}
    blocks = {k: b for s in stages for k, b in s.transformer.h.items()}
    merged.transformer = nn.ModuleDict(modules)
    merged.transformer["h"] = StageBlocks({k: blocks[k] for k in sorted(blocks, key=int)})
    merged.lm_head = next((s.lm_head for s in stages if s.is_last), None)
    return merged


def build_schedule(
    stages: list[StageModel], group: dist.ProcessGroup, n_microbatches: int, schedule: str, device: torch.device
):
    """The training schedule over this rank's stages: each micro-batch's mean loss, divided by
    n_microbatches, is backpropagated (the loop's gradient accumulation: the summed gradients are the
    mean's), so torch's own 1/n_microbatches scaling is off (torchtitan's rescale_accumulated_loss)."""
    n_stages = group.size() * len(stages)
    pipeline_stages = [PipelineStage(m, m.stage_index, n_stages, device, group=group) for m in stages]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets) / n_microbatches

    cls = SCHEDULES[schedule]
    first = pipeline_stages if cls is ScheduleInterleaved1F1B else pipeline_stages[0]
    return cls(first, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def last_rank(group: dist.ProcessGroup) -> int:
    """The pp rank (in the group) of the last stage: the last rank, in loop order."""
    return group.size() - 1


def pipeline_step(schedule, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], group: dist.ProcessGroup):
    """Forward and backward of every micro-batch (x, y), each (b, T), through the schedule. Returns
    their mean loss (a 0-d fp32 tensor), broadcast from the last stage so every pp rank has it."""
    x = torch.cat([m[0] for m in micro_batches])  # (n * b, T): the schedule splits it back, in order
    y = torch.cat([m[1] for m in micro_batches])
    losses: list[torch.Tensor] = []
    schedule.step(x, target=y, losses=losses, tokens=x, return_outputs=False)
    losses = [loss.full_tensor() if isinstance(loss, DTensor) else loss for loss in losses]  # loss parallel
    mean = torch.stack(losses).sum().detach().float() if losses else torch.zeros((), device=x.device)
    dist.broadcast(mean, group=group, group_src=last_rank(group))
    return mean


class PipelineModel(GPT):
    """The pipelined model seen as a GPT for forward-only use (model/loss.py's mean loss, sampling with
    the KV cache, HellaSwag): GPT.forward with trunk run stage by stage across the pp ranks and the
    logits broadcast from the last stage, so every rank returns the same result. Every pp rank must
    call it with the same ids (all of them know every shape, so no metadata is exchanged). A plain
    point-to-point chain, not a schedule: torch's schedules fix the micro-batch shape at their first
    step, and evaluation batches, growing prompts and HellaSwag rows change it. The residual stream
    travels in fp32; the logits (B, T, V) are broadcast in fp32."""

    def __init__(self, stages: list[StageModel], group: dist.ProcessGroup, seq_shards: int = 1):
        nn.Module.__init__(self)
        # under tensor parallel (seq_shards = tp) the residual stream between stages is sequence-sharded
        self.config, self.group, self.seq_shards = stages[0].config, group, seq_shards
        self.stages = nn.ModuleList(stages)
        self.n_stages = group.size() * len(stages)
        if hasattr(stages[0], "rope_cos"):
            self.register_buffer("rope_cos", stages[0].rope_cos, persistent=False)
            self.register_buffer("rope_sin", stages[0].rope_sin, persistent=False)

    def trunk(self, idx, pos, kv_update=None, attn_mask=None, is_causal=True):
        """The last stage's output on its rank -- the logits (B, T, V), head included, since a stage
        runs as one module call -- and an empty (B, T, 0) placeholder on the other ranks, which head()
        replaces by the broadcast logits (callers may slice positions first, as GPT.head's are)."""
        pp, me = self.group.size(), self.group.rank()
        B, T = idx.shape
        local = {m.stage_index: m for m in self.stages}
        window = {"pos": pos, "kv_update": kv_update, "attn_mask": attn_mask, "is_causal": is_causal}
        x = idx
        for s in range(self.n_stages):
            if s % pp != me:
                continue
            if s > 0:  # the previous stage is on the previous rank (loop order, pp > 1)
                x = torch.empty(B, T // self.seq_shards, self.config.n_embd, device=idx.device)  # (B, T / tp, C)
                dist.recv(x, group=self.group, group_src=(s - 1) % pp)
            x = local[s](x, **window)
            if isinstance(x, DTensor):  # logits split over the vocabulary (loss parallel): (B, T, V)
                x = x.full_tensor()
            if s < self.n_stages - 1:
                dist.send(x.float().contiguous(), group=self.group, group_dst=(s + 1) % pp)
        return x if me == last_rank(self.group) else idx.new_empty(B, T, 0, dtype=torch.float32)

    def head(self, logits):
        """Logits (B, T, V) in fp32 on every pp rank: the last stage's (trunk's output there), broadcast."""
        src = last_rank(self.group)
        if self.group.rank() == src:
            logits = logits.float().contiguous()
            shape = torch.tensor(logits.shape, device=logits.device)
        else:
            shape = torch.zeros(3, dtype=torch.long, device=self._device())
        dist.broadcast(shape, group=self.group, group_src=src)
        if self.group.rank() != src:
            logits = torch.empty(*shape.tolist(), device=self._device())
        dist.broadcast(logits, group=self.group, group_src=src)
        return logits

    def _device(self) -> torch.device:
        return next(self.stages[0].parameters()).device


def tied_table(stages: list[StageModel], group: dist.ProcessGroup) -> tuple[nn.Parameter, int] | None:
    """With tied embeddings, on the first and the last pp rank: (this rank's copy of the token table, the
    other rank's index in the group); None elsewhere, untied, or without a pipeline."""
    me, last = group.rank(), last_rank(group)
    if not stages[0].config.tie_embeddings or last == 0 or me not in (0, last):
        return None
    table = next(s.transformer.wte.weight for s in stages if "wte" in s.transformer)
    return table, last - me


def _exchange(mine: torch.Tensor, peer: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Send `mine` to the peer and receive the peer's tensor of the same shape."""
    theirs = torch.empty_like(mine)
    ops = [
        dist.P2POp(dist.isend, mine, group=group, group_peer=peer),
        dist.P2POp(dist.irecv, theirs, group=group, group_peer=peer),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return theirs


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t  # FSDP / tp: both copies have the same placements


def sync_tied_weights(stages: list[StageModel], group: dist.ProcessGroup) -> None:
    """The last stage's copy of a tied token table := the first stage's (after initialisation). Every pp
    rank calls; only the first and the last exchange."""
    tied = tied_table(stages, group)
    if tied is not None:
        table, peer = tied
        with torch.no_grad():
            first = _exchange(_local(table).detach().contiguous(), peer, group)
            if group.rank() != 0:
                _local(table).copy_(first)


def sync_tied_grads(stages: list[StageModel], group: dist.ProcessGroup) -> None:
    """A tied token table's gradient: the embedding's (first stage) plus the head's (last stage), on both
    ranks (Megatron-LM's embedding-group all-reduce, as a point-to-point exchange between the two: a sum
    of two terms is the same in either order, so the copies stay bitwise equal). Every pp rank calls."""
    tied = tied_table(stages, group)
    if tied is not None:
        table, peer = tied
        grad = _local(table.grad)  # (V, C) or its shard
        grad.add_(_exchange(grad.contiguous(), peer, group))


def clip_grad_norm_(stages: list[StageModel], max_norm: float, group: dist.ProcessGroup) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the parameters of every pp rank's stages: the 2-norm of every
    rank's gradients together (each stage's squared norm summed over the group, as torchtitan's
    clip_grad_norm_ does for pp; a tied table's two copies counted once), and the same clipping factor on
    every rank. DTensor gradients (FSDP, tensor parallel) give their full norm. Returns the global
    pre-clip norm (fp32, 0-d)."""
    from train.parallel.mesh_strategy import grad_norm, group_by_mesh

    held = [p for p in dict.fromkeys(p for s in stages for p in s.parameters()) if p.grad is not None]
    tied = tied_table(stages, group)
    copy = tied[0] if tied is not None and group.rank() == last_rank(group) else None
    sq = grad_norm(group_by_mesh([p for p in held if p is not copy])).float() ** 2
    dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    for params in group_by_mesh(held):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
