"""What one rank holds for a training layout, computed from the real model: shapes come from GPT(cfg)
built on the meta device, activations from a forward + backward traced on fake tensors. No parameter
or activation formula is kept by hand, so nothing here drifts from model/gpt.py.

Layout: the mesh degrees (dp_replicate x dp_shard x cp x tp x pp), or DeepSpeed's ZeRO stage over
dp ranks, plus the micro-batch and activation checkpointing. Per rank (bytes):
- params, grads: the rank's share of each parameter. FSDP2 shards dim 0 over dp_shard x cp, padding
  it to a multiple of the shard count (the rank holds ceil(dim0 / n) rows, rank 0 the most); tensor
  parallel splits the weights of train/parallel/parallelize.py's plan (colwise: q/k/v, MLP in, and
  under loss parallel the head, along their output rows; rowwise: the output projections along their
  inputs; norms and the token table whole); pipeline
  parallel gives each stage its blocks (the first also the embeddings, the last the final norm and
  head, and a tied table lives on both).
- optimizer: AdamW's exp_avg + exp_avg_sq (fp32) and one float32 step count per tensor; Muon's momentum
  for its matrices (train/optim.py's muon_params). DeepSpeed adds its fp32 master partition ("master").
- DeepSpeed (ZeRO, Rajbhandari et al. 2020, sec. 5): the engine keeps the module in the training
  dtype and its fp32 master copy, Adam moments and reduced gradients partitioned over the dp ranks;
  stage 3 partitions the module too, and allocates its gradient partition, its reduce bucket
  (reduce_bucket_size elements) and an fp32 gradient buffer of the unpartitioned model (at most
  sub_group_size elements) for the optimizer step.
- activations: the peak bytes of the tensors a forward + backward of one micro-batch keeps alive,
  other than parameters and gradients (saved activations, logits, the autocast copies of weights),
  traced on fake tensors (torch._subclasses.FakeTensorMode, which allocates nothing) with the run's
  autocast dtype and checkpointing.
- fp8 (train.fp8, train/fp8.py): parameters, gradients and optimizer state are unchanged (torchao's
  Float8Linear keeps nn.Linear's high-precision parameters). The activations are traced on the model
  converted by train/fp8.py (torchao's emulation: the same casts and saved tensors), so they count
  what torchao's matmul_with_hp_or_float8_args keeps (torchao/float8/float8_linear.py): it saves its
  input in the autocast dtype and the weight itself (no autocast copy of the weight, which nn.Linear
  saves), and casts both to float8 again in the backward; the float8 casts (1 byte an element) are
  transients. The emulated matmul also upcasts its float8 operands, a transient that a GPU's
  torch._scaled_mm does not make, so the trace errs high by at most one such copy. Under FSDP2 with
  tensorwise scaling the converted weights are all-gathered in float8 (torchao's
  WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather), so the all-gather buffer holds them at one
  byte an element; the amax and scale buffers (one float32 per tensor) are left out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from model import GPT, ModelConfig
from train.parallel.dims import DIMS, ParallelDims

# The TP plan of train/parallel/parallelize.py (torchtitan's, on this model's module names): which dim
# of a parameter tp splits. Norms are sequence-parallel (replicated gains), the token table stays
# whole, and the head is split by vocabulary rows only under loss parallel (head_is_split).
TP_SHARD_DIM = {
    "attn.c_attn.weight": 0,  # ColwiseParallel
    "attn.c_attn.bias": 0,
    "attn.c_proj.weight": 1,  # RowwiseParallel (its bias is replicated)
    "mlp.c_fc.weight": 0,
    "mlp.c_fc.bias": 0,
    "mlp.c_proj.weight": 1,
}


def head_is_split(cfg: ModelConfig) -> bool:
    """Loss parallel's condition: an untied head with no padded rows to drop and no soft-capping."""
    return not cfg.tie_embeddings and cfg.padded_vocab_size == cfg.vocab_size and cfg.logit_softcap is None


DEEPSPEED_REDUCE_BUCKET = 500_000_000  # zero_optimization.reduce_bucket_size's default (DeepSpeed docs)
DEEPSPEED_SUB_GROUP = 1_000_000_000  # zero_optimization.sub_group_size's default (DeepSpeed docs)


@dataclass(frozen=True)
class Layout(ParallelDims):
    """A layout the planner weighs: the mesh degrees as the run's ParallelDims (train/parallel/dims.py,
    the one place of their arithmetic: dp_size, shard_size, uses_fsdp, ...) over the world they multiply
    to, plus what varies beside the mesh."""

    zero: int = 0  # DeepSpeed ZeRO stage over dp_replicate ranks; 0: torch-native
    micro_batch: int = 1
    ac: bool = False  # activation checkpointing of every block

    def __post_init__(self) -> None:
        object.__setattr__(self, "world_size", math.prod(getattr(self, d) for d in DIMS))
        super().__post_init__()

    @classmethod
    def of(cls, dims: ParallelDims, **rest) -> Layout:
        """The layout of a run's resolved dims (its -1 filled in), with the planner's other fields."""
        return cls(**{d: getattr(dims, d) for d in DIMS}, **rest)


@dataclass
class Footprint:
    """Bytes per rank (the most loaded rank: pipeline stage and shard with the most)."""

    params: int  # the rank's weights, and the buffers
    grads: int
    optimizer: int  # moments (+ step counts) and, under DeepSpeed, the fp32 master partition
    master: int  # the DeepSpeed master partition alone (part of optimizer)
    activations: int  # one micro-batch's peak (times the in-flight micro-batches of pipeline stage 0)
    temporaries: dict[str, int]  # the largest transient buffers, by name

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + sum(self.temporaries.values())

    def items(self) -> dict[str, int]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            **self.temporaries,
        }


def meta_model(mcfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(mcfg)


def dtype_bytes(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def param_shares(model: GPT, layout: Layout) -> list[tuple[str, nn.Parameter, int]]:
    """(name, parameter, elements this rank holds) for every parameter of the most loaded stage
    (pipeline rank), after tensor parallel and FSDP sharding (rank 0's share, the largest)."""
    cfg, pp = model.config, layout.pp
    tied = cfg.tie_embeddings
    stages: dict[int, list] = {s: [] for s in range(pp)}
    for name, p in model.named_parameters():
        if name.startswith("transformer.h."):
            where = {int(name.split(".")[2]) * pp // cfg.n_layer}
        elif name.startswith("transformer.wte"):
            where = {0, pp - 1} if tied else {0}
        elif name.startswith("transformer.wpe"):
            where = {0}
        else:
            where = {pp - 1}
        shape = list(p.shape)
        key = ".".join(name.split(".")[-3:]) if name.startswith("transformer.h.") else name
        dim = 0 if name == "lm_head.weight" and head_is_split(cfg) else TP_SHARD_DIM.get(key)
        if layout.tp > 1 and dim is not None:
            shape[dim] = math.ceil(shape[dim] / layout.tp)
        if layout.zero == 0 and layout.shard_size > 1:
            shape[0] = math.ceil(shape[0] / layout.shard_size)  # FSDP2: dim 0, padded
        for s in where:
            stages[s].append((name, p, math.prod(shape)))
    return max(stages.values(), key=lambda share: sum(n for _, _, n in share))


def float8_params(model: GPT, fp8: str) -> set[str]:
    """Names of the weights that train.fp8 runs in float8: those of the Linear layers train/fp8.py
    converts (its own filter)."""
    if fp8 == "none":
        return set()
    from train.fp8 import keep_linear

    return {f"{n}.weight" for n, m in model.named_modules() if keep_linear(m, n)}


def state_bytes(
    model: GPT, layout: Layout, dtype: str, optimizer: str = "adamw", accum: int = 1, fp8: str = "none"
) -> Footprint:
    """Parameters, gradients and optimizer state of one rank (activations filled in by the caller).
    fp8: train.fp8's recipe, which changes only the FSDP all-gather (float8 weights under tensorwise)."""
    share = param_shares(model, layout)
    elems = sum(n for _, _, n in share)
    temps: dict[str, int] = {}
    if layout.zero:
        return _deepspeed_bytes(share, elems, layout, dtype, accum, buffer_bytes(model))
    muon = set()
    if optimizer == "muon":
        from train.optim import muon_params

        muon = {id(p) for p in muon_params(model)}
    moments = sum((1 if id(p) in muon else 2) * 4 * n for _, p, n in share)
    steps = 4 * sum(1 for _, p, _ in share if id(p) not in muon)  # AdamW's float32 step per tensor
    grads = 4 * elems  # fp32 gradients; autocast casts per matmul
    params = 4 * elems + buffer_bytes(model)  # fp32 weights, and the buffers (RoPE tables) on every rank
    cbytes = dtype_bytes(dtype)
    if layout.shard_size > 1:
        # FSDP2 all-gathers one block's parameters in the compute dtype (tensorwise fp8: its converted
        # weights in float8), and prefetches the next.
        in_fp8 = float8_params(model, fp8) if fp8 == "tensorwise" else set()
        temps["FSDP all-gather (2 blocks)"] = 2 * _largest_block_bytes(model, layout, cbytes, in_fp8)
        if accum > 1:  # without gradient sync, unsharded gradients accumulate between micro-batches
            temps["FSDP unsharded grads (accumulation)"] = elems * layout.shard_size * cbytes
    elif layout.dp_replicate > 1:
        temps["DDP gradient buckets"] = 4 * elems  # a bucket copy of every gradient (gradient_as_bucket_view off)
    return Footprint(params, grads, moments + steps, 0, 0, temps)


def buffer_bytes(model: GPT) -> int:
    """Bytes of the model's buffers (the RoPE tables), whole on every rank, in fp32 as built."""
    return sum(b.numel() * b.element_size() for b in model.buffers())


def _deepspeed_bytes(share, elems: int, layout: Layout, dtype: str, accum: int, buffers: int) -> Footprint:
    n = layout.dp_size
    pbytes = 4 if dtype == "float32" else dtype_bytes(dtype)  # the engine casts the module for bf16/fp16
    part = math.ceil(elems / n)
    params = pbytes * (part if layout.zero == 3 else elems) + buffers * pbytes // 4  # buffers cast as the module
    # Reduced gradients: the rank's partition. Stage 1 accumulates full gradients between boundaries.
    # Stage 3's initialize_optimizer_states (deepspeed/runtime/zero/stage3.py) also allocates an fp32
    # gradient buffer of its largest sub-group's *unpartitioned* size (ds_numel; sub_group_size elements
    # at most), which the optimizer steps on.
    grads = pbytes * (elems if layout.zero == 1 and accum > 1 else part)
    if layout.zero == 3:
        grads += 4 * min(elems, DEEPSPEED_SUB_GROUP)
    master = 4 * part
    moments = 8 * part + 4 * 2  # torch AdamW over the master partition: one step count per param group
    # (train/optim.py's two groups, decay and no_decay)
    temps = {}
    if layout.zero == 3:
        temps["ZeRO-3 reduce bucket"] = DEEPSPEED_REDUCE_BUCKET * pbytes
    return Footprint(params, grads, master + moments, master, 0, temps)


def _largest_block_bytes(model: GPT, layout: Layout, cbytes: int, in_fp8: set[str]) -> int:
    """All-gathered bytes of the largest FSDP unit after tensor parallel: a block, or the root
    (embeddings, final norm, head); the parameters named in in_fp8 at one byte, the rest at cbytes."""
    units: dict[str, int] = {}
    for n, p in model.named_parameters():
        unit = ".".join(n.split(".")[:3]) if n.startswith("transformer.h.") else "root"
        units[unit] = units.get(unit, 0) + p.numel() * (1 if n in in_fp8 else cbytes)
    return math.ceil(max(units.values()) / layout.tp)


# ----------------------------------------------------------------------------- activations


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops create and that are still alive, and their peak.
    Storages are followed through weak references, so a freed tensor leaves the count when it dies
    (torch.distributed._tools.mem_tracker.MemTracker's approach, without its module bookkeeping).
    forget(t) takes a tensor's storage out of the count (a gradient landing in .grad is not an
    activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = WeakIdKeyDictionary()  # UntypedStorage -> [bytes still counted]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out

    def _add(self, st) -> None:
        if st in self.live:
            return
        counted = [st.nbytes()]
        self.live[st] = counted
        self.now += counted[0]
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._drop, counted)

    def _drop(self, counted: list[int]) -> None:
        self.now -= counted[0]
        counted[0] = 0

    def forget(self, t: torch.Tensor) -> None:
        counted = self.live.get(t.untyped_storage())
        if counted is not None:
            self._drop(counted)
        return None  # as a tensor hook: the gradient passes unchanged


def step_peak(
    model: nn.Module, idx: torch.Tensor, dtype: str, device_type: str = "cpu", gpu_autocast: bool = False
) -> int:
    """Peak live bytes of the tensors that one forward + backward of `model` on idx (B, T) creates,
    the gradients left in .grad excepted: the activation memory of a micro-batch. gpu_autocast: also
    raise CUDA's autocast flag (no CUDA needed), which torchao's Float8Linear reads on any device to
    cast its input to the autocast dtype, so that a CPU trace keeps what a GPU run keeps."""
    from train.device import autocast_ctx

    tracker = LiveBytes()
    # A parameter's gradient is the grads' item, from the moment autograd hands it to the parameter
    # (MemTracker's GRAD): with tied weights, the partial gradients summed before that stay activations.
    hooks = [p.register_hook(tracker.forget) for p in model.parameters() if p.requires_grad]
    with tracker, _cuda_autocast_flag(dtype if gpu_autocast else "float32"):
        with autocast_ctx(torch.device(device_type), dtype):
            loss = model(idx, idx)
        loss.backward()
    for h in hooks:
        h.remove()
    return tracker.peak


class _cuda_autocast_flag:
    """CUDA's autocast flag and dtype raised for a block (a no-op for float32), restored after."""

    def __init__(self, dtype: str) -> None:
        self.dtype = None if dtype == "float32" else getattr(torch, dtype)

    def __enter__(self) -> None:
        if self.dtype is not None:
            self.saved = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", self.dtype)

    def __exit__(self, *exc) -> None:
        if self.dtype is not None:
            torch.set_autocast_enabled("cuda", self.saved[0])
            torch.set_autocast_dtype("cuda", self.saved[1])


def fp8_model(mcfg: ModelConfig, fp8: str) -> GPT:
    """GPT(mcfg) on the current device, its Linear layers converted by train/fp8.py in torchao's
    emulation where fp8 names a recipe (the casts and saved tensors of a GPU run)."""
    model = GPT(mcfg)
    if fp8 != "none":
        from train import fp8 as float8

        float8.convert(model, fp8, emulate=True, fsdp=False)
    return model


def _traced(mcfg: ModelConfig, n_layer: int, batch: int, seq: int, dtype: str, ac: bool, fp8: str) -> int:
    return _traced_json(json.dumps(mcfg.to_dict(), sort_keys=True), n_layer, batch, seq, dtype, ac, fp8)


@functools.cache
def _traced_json(mcfg_json: str, n_layer: int, batch: int, seq: int, dtype: str, ac: bool, fp8: str) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mcfg = ModelConfig.from_dict(json.loads(mcfg_json))
    cfg = dataclasses.replace(mcfg, n_layer=n_layer, block_size=max(mcfg.block_size, seq))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = fp8_model(cfg, fp8)
        if ac:
            from train.ac import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        idx = torch.zeros(batch, seq, dtype=torch.long)
        return step_peak(model, idx, dtype, gpu_autocast=fp8 != "none")


def activation_bytes(
    mcfg: ModelConfig, batch: int, seq: int, dtype: str, ac: bool, fp8: str = "none"
) -> tuple[int, int]:
    """(bytes outside the blocks, bytes per block) of one micro-batch of `batch` x `seq` tokens, from
    fake forward + backward traces of 1 and 2 blocks at batch 1 and 2, each linear in the batch.
    fp8: train.fp8's recipe; the trace runs the converted model."""

    def at(b: int) -> tuple[int, int]:
        one, two = _traced(mcfg, 1, b, seq, dtype, ac, fp8), _traced(mcfg, 2, b, seq, dtype, ac, fp8)
        return one - (two - one), two - one

    (f1, l1), (f2, l2) = at(1), at(2)
    return f1 + (f2 - f1) * (batch - 1), l1 + (l2 - l1) * (batch - 1)
