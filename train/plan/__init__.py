"""The planner: will this config fit, and which layout trains it fastest? Answered before the
launch (`python -m train.plan`, train/plan/__main__.py), from the real model (train/footprint.py) and
the GPU's datasheet (train/hardware.py).

    python -m train.plan --config configs/gpt2-124m.yaml --gpus 8 --gpu h100-sxm
    python -m train.plan --config configs/gpt2-350m.yaml --gpus 16 --nodes 2 --gpu a100-80g train.micro_batch=8

For the config's model, sequence length and global batch (train.tokens_per_step), every candidate
layout of the GPUs (data parallel replicate / shard, tensor, context and pipeline parallel degrees
where the config has them, DeepSpeed ZeRO 1/2/3), micro-batch and activation checkpointing gets,
per rank: parameters, gradients, optimizer state, activations, the largest temporary buffers and
their total against the GPU's memory; and an estimated step time, tokens/s and MFU.

The time model (docs/distributed.md, "Will it fit?"): compute = the model FLOPs of the rank's share
of the step (GPT.flops_per_token; activation checkpointing adds one forward of the blocks) at
--efficiency x the dense peak; each parallel dimension moves its bytes (ring collectives: a rank
sends (n-1)/n of the buffer per all-gather or reduce-scatter, twice that per all-reduce) over
NVLink when its group lies within a node, else over the network. FSDP and data-parallel gradient
traffic overlaps the compute (prefetch, bucketed reduction); tensor, context and pipeline traffic
and the pipeline bubble (1F1B: (pp - 1) / micro-batches of the compute) add to it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from model.errors import UserError
from train.config import Config
from train.footprint import (
    Footprint,
    Layout,
    activation_bytes,
    dtype_bytes,
    float8_params,
    meta_model,
    state_bytes,
)
from train.fp8 import peak_dtype
from train.hardware import GPU, NETWORK_GBPS, peak_tflops
from train.parallel.dims import DIMS, ParallelDims

GIB = 1024**3
HEADROOM = 0.9  # the share of GPU memory a run may plan for: the caching allocator fragments, and the
# CUDA context and NCCL buffers take a few hundred MB (PyTorch's CUDA memory notes)
EFFICIENCY = 0.5  # the share of the dense peak the matmuls reach: a planning assumption, not a measurement;
# --efficiency sets it (tests/gpu_check.sh prints the measured MFU beside this estimate)


class PlanError(UserError, ValueError):
    """A planner flag or config the user can fix; the message says how."""


@dataclass(frozen=True)
class Hardware:
    gpu: GPU
    gpus_per_node: int
    nodes: int
    intra_gbps: float  # per GPU, per direction, inside a node
    inter_gbps: float  # per GPU, per direction, between nodes
    efficiency: float = EFFICIENCY

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def memory(self) -> float:
        return self.gpu.memory_gib * GIB


@dataclass
class Estimate:
    layout: Layout
    accum: int
    footprint: Footprint
    logits: int  # bytes of one micro-batch's fp32 logits (inside the activations)
    fits: bool
    step_s: float
    tokens_per_s: float
    mfu: float
    comm: dict[str, tuple[float, float, str]] = field(default_factory=dict)  # dim -> (bytes, s, link)


def model_config(cfg: Config):
    """The config's ModelConfig with the vocabulary filled in (train.bench's rule)."""
    from train.dataset import bench_model_config

    return bench_model_config(cfg)


def run_dtype(cfg: Config) -> str:
    """The dtype a run of this config uses on a GPU: auto is bfloat16 there (train.dtype's rule)."""
    return "bfloat16" if cfg.train.dtype in ("auto", "float16") else cfg.train.dtype


def has_mesh(cfg: Config) -> bool:
    return all(hasattr(cfg.parallel, k) for k in ("dp_replicate", "dp_shard", "tp", "cp", "pp"))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_dims_available() -> dict[str, bool]:
    """Which mesh dimensions this checkout can run: tp comes with the mesh; cp and pp with their
    modules (train/parallel/context.py, train/parallel/pipeline.py)."""
    import importlib.util

    def there(mod: str) -> bool:
        try:
            return importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            return False

    return {
        "tp": there("train.parallel.parallelize"),
        "cp": there("train.parallel.context"),
        "pp": there("train.parallel.pipeline"),
    }


def layout_ok(cfg: Config, mcfg, rep: int, shard: int, cp: int, tp: int, pp: int) -> bool:
    """Whether the mesh accepts these degrees for this model: train/parallel/dims.py's own check."""
    from train.parallel.dims import MeshError, check_model

    try:
        check_model(Layout(dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, pp=pp), mcfg, cfg.seq_len)
    except MeshError:
        return False
    return True


def candidates(cfg: Config, mcfg, world: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of `world` GPUs this checkout can run for this config: strategies none / ddp / fsdp /
    deepspeed, and with the device mesh every dp_replicate x dp_shard x cp x tp x pp that the mesh's
    check_model accepts, with tp within a node. Then each micro-batch that divides the rank's rows (powers
    of two, and the whole share), with and without activation checkpointing."""
    rows = cfg.train.tokens_per_step // cfg.seq_len
    meshes: list[tuple[int, int, int, int, int, int]] = []  # (rep, shard, cp, tp, pp, zero)
    if has_mesh(cfg):
        can = mesh_dims_available()
        for tp in divisors(min(world, gpus_per_node)) if can["tp"] else [1]:
            for cp in divisors(world // tp) if can["cp"] else [1]:
                for pp in divisors(world // (tp * cp)) if can["pp"] else [1]:
                    dp = world // (tp * cp * pp)
                    for shard in divisors(dp):
                        if layout_ok(cfg, mcfg, dp // shard, shard, cp, tp, pp):
                            meshes.append((dp // shard, shard, cp, tp, pp, 0))
    elif world == 1:
        meshes.append((1, 1, 1, 1, 1, 0))
    else:
        meshes += [(world, 1, 1, 1, 1, 0), (1, world, 1, 1, 1, 0)]
    # ZeRO flattens parameters: no Muon; and no fp8 under DeepSpeed (train/config.py)
    if world > 1 and cfg.optim.name != "muon" and cfg.train.fp8 == "none":
        meshes += [(world, 1, 1, 1, 1, z) for z in (1, 2, 3)]
    out = []
    for rep, shard, cp, tp, pp, zero in meshes:
        dp = rep * shard
        if rows % dp:
            continue
        for mb in divisors(rows // dp):
            if mb & (mb - 1) and mb != rows // dp:
                continue
            for ac in (False, True):
                out.append(
                    Layout(dp_replicate=rep, dp_shard=shard, cp=cp, tp=tp, pp=pp, zero=zero, micro_batch=mb, ac=ac)
                )
    return out


def link(layout: Layout, dim: str, hw: Hardware) -> tuple[float, str]:
    """(GB/s, name) of the link a dimension's collectives use: the mesh is laid out with tp innermost
    (torchtitan's order pp, dp_replicate, dp_shard, cp, tp), so a group spans its own degree times the
    degrees inside it, and stays on NVLink while that span fits in a node."""
    order = DIMS[::-1]  # innermost first
    span = math.prod(getattr(layout, d) for d in order[: order.index(dim) + 1])
    if span <= hw.gpus_per_node:
        return hw.intra_gbps, "node link"
    return hw.inter_gbps, "network"


def estimate(cfg: Config, model, layout: Layout, hw: Hardware) -> Estimate:
    """The footprint and step time of one layout (the module docstring gives the model)."""
    mcfg, seq, dtype = model.config, cfg.seq_len, run_dtype(cfg)
    rows = cfg.train.tokens_per_step // seq
    accum = rows // (layout.dp_size * layout.micro_batch)
    fp8 = cfg.train.fp8  # train/footprint.py: what fp8 changes in the activations and the FSDP all-gather
    fp = state_bytes(model, layout, dtype, cfg.optim.name, accum, fp8)
    local_seq = seq // layout.cp
    fixed, per_block = activation_bytes(mcfg, layout.micro_batch, local_seq, dtype, layout.ac, fp8)
    blocks = math.ceil(mcfg.n_layer / layout.pp)
    in_flight = min(layout.pp, accum)  # 1F1B: stage 0 holds pp micro-batches' activations
    fp.activations = math.ceil((fixed + per_block * blocks * in_flight) / layout.tp)
    cbytes = dtype_bytes(dtype)
    tokens_mb = layout.micro_batch * local_seq
    if layout.tp > 1:  # sequence-parallel all-gather output / reduce-scatter input of a block
        fp.temporaries["TP collective buffer"] = 2 * tokens_mb * mcfg.n_embd * cbytes
    if layout.cp > 1:  # one layer's K and V gathered over the cp group
        fp.temporaries["CP K/V all-gather"] = (
            2 * tokens_mb * layout.cp * mcfg.n_kv_head * mcfg.head_dim * cbytes // layout.tp
        )
    logits = tokens_mb * mcfg.padded_vocab_size * 4 // layout.tp
    fits = fp.total <= HEADROOM * hw.memory

    # time
    # an fp8 run's matmuls at the fp8 peak; a GPU without fp8 units refuses fp8 at start-up (train/fp8.py)
    fp8_peak = peak_tflops(hw.gpu, "float8") if peak_dtype(cfg.train) == "float8" else None
    peak = (fp8_peak or peak_tflops(hw.gpu, dtype)) * 1e12
    flops_rank = model.flops_per_token(seq) * cfg.train.tokens_per_step / layout.world_size
    if layout.ac:  # one more forward of the blocks: 2 of the 6 FLOPs per parameter, a third of the attention
        flops_rank *= 4 / 3
    compute = flops_rank / (peak * hw.efficiency)
    if layout.pp > 1:
        compute *= 1 + (layout.pp - 1) / accum
    comm = comm_volumes(cfg, model, layout, accum, dtype)
    overlapped = exposed = 0.0
    timed = {}
    for dim, (nbytes, hidden) in comm.items():
        gbps, where = link(layout, "dp_replicate" if dim == "zero" else dim, hw)
        seconds = nbytes / (gbps * 1e9)
        timed[dim] = (nbytes, seconds, where)
        if hidden:
            overlapped += seconds
        else:
            exposed += seconds
    step = max(compute, overlapped) + exposed
    tokens_per_s = cfg.train.tokens_per_step / step
    mfu = model.flops_per_token(seq) * tokens_per_s / (layout.world_size * peak)
    return Estimate(layout, accum, fp, logits, fits, step, tokens_per_s, mfu, timed)


def comm_volumes(cfg: Config, model, layout: Layout, accum: int, dtype: str) -> dict[str, tuple[float, bool]]:
    """dim -> (bytes one rank sends per optimizer step, whether it overlaps the compute)."""
    mcfg, cbytes = model.config, dtype_bytes(dtype)
    ring = lambda n: (n - 1) / n  # noqa: E731 -- a ring all-gather / reduce-scatter's share
    params = sum(p.numel() for p in model.parameters()) / (layout.tp * layout.pp)  # one stage's, tp-split
    tokens_mb = layout.micro_batch * cfg.seq_len / layout.cp
    layers = math.ceil(mcfg.n_layer / layout.pp)
    out: dict[str, tuple[float, bool]] = {}
    if layout.zero:
        n, pbytes = layout.dp_size, 4 if dtype == "float32" else cbytes
        # reduce-scatter of the gradients, all-gather of the updated parameters; stage 3 gathers the
        # parameters for every micro-batch's forward and backward instead
        gathers = 2 * accum if layout.zero == 3 else 1
        out["zero"] = ((1 + gathers) * ring(n) * params * pbytes, True)
        return out
    if layout.shard_size > 1:  # FSDP: all-gather forward and backward per micro-batch, reduce-scatter per step
        n = layout.shard_size
        # tensorwise fp8 gathers its converted weights in float8 (1 byte), the rest in the compute dtype
        in_fp8 = float8_params(model, cfg.train.fp8) if cfg.train.fp8 == "tensorwise" else set()
        fp8_share = sum(p.numel() for name, p in model.named_parameters() if name in in_fp8) / (layout.tp * layout.pp)
        gathered = (params - fp8_share) * cbytes + fp8_share
        out["dp_shard"] = ((2 * accum * gathered + 4 * params) * ring(n), True)
    if layout.dp_replicate > 1:  # all-reduce of the (sharded) fp32 gradients
        out["dp_replicate"] = (2 * ring(layout.dp_replicate) * 4 * params / layout.shard_size, True)
    if layout.tp > 1:  # Korthikanti et al. 2022: 4 collectives of the block's activations forward, 4 backward
        per_elem = 8 * cbytes
        if cfg.train.fp8 == "tensorwise":  # train/fp8.py's tp_styles: the 2 input all-gathers move float8,
            # and without biases so do the 2 backward all-gathers of the output gradients
            per_elem -= (2 if mcfg.bias else 4) * (cbytes - 1)
        out["tp"] = (ring(layout.tp) * tokens_mb * mcfg.n_embd * per_elem * layers * accum, False)
    if layout.cp > 1:  # K and V all-gathered forward, their gradients reduce-scattered backward
        kv = 2 * tokens_mb * layout.cp * mcfg.n_kv_head * mcfg.head_dim * cbytes / layout.tp
        out["cp"] = (2 * ring(layout.cp) * kv * layers * accum, False)
    if layout.pp > 1:  # the boundary activation forward and its gradient backward, per micro-batch
        out["pp"] = (2 * tokens_mb * mcfg.n_embd * cbytes / layout.tp * accum, False)
    return out


def plan(cfg: Config, hw: Hardware) -> list[Estimate]:
    """Every candidate's estimate, the fitting ones first, each group fastest first; among estimates
    within 1% of each other, fewer accumulation steps first (larger micro-batches run the matmuls
    nearer their peak, which the time model does not see), then torch-native before DeepSpeed, then the
    smaller footprint."""
    model = meta_model(model_config(cfg))
    rows = cfg.train.tokens_per_step // cfg.seq_len
    if rows * cfg.seq_len != cfg.train.tokens_per_step:
        raise PlanError(
            f"train.tokens_per_step ({cfg.train.tokens_per_step}) is not a multiple of the sequence length "
            f"({cfg.seq_len}); make it one"
        )
    layouts = candidates(cfg, model.config, hw.world, hw.gpus_per_node)
    if not layouts:
        raise PlanError(
            f"no layout of {hw.world} GPUs divides the {rows} sequences of a step "
            f"(train.tokens_per_step / seq_len): use a GPU count that divides {rows}"
        )
    out = [estimate(cfg, model, lay, hw) for lay in layouts]
    return sorted(
        out, key=lambda e: (not e.fits, round(math.log(e.step_s), 2), e.accum, e.layout.zero > 0, e.footprint.total)
    )


# ----------------------------------------------------------------------------- pre-flight


def current_layout(cfg: Config, world: int) -> Layout:
    """The layout a config runs with on `world` ranks: the run's own ParallelDims.from_options (the
    shorthands and the -1 degree resolved there), DeepSpeed's ZeRO stage laid out over dp_replicate."""
    p = cfg.parallel
    dims = ParallelDims.from_options(p.strategy, cfg.parallel_options(), world)
    zero = p.zero_stage if p.strategy == "deepspeed" else 0
    return Layout.of(dims, zero=zero, micro_batch=cfg.train.micro_batch, ac=cfg.train.activation_checkpointing)


def preflight_message(cfg: Config, world: int, gpu: GPU) -> str | None:
    """None when the config's layout fits the GPU, else one line: the estimated total, the biggest
    item, and the fastest layout of the same GPUs that fits (or that none does)."""
    hw = Hardware(gpu, world, 1, gpu.link_gbps, NETWORK_GBPS)
    model = meta_model(model_config(cfg))
    mine = estimate(cfg, model, current_layout(cfg, world), hw)
    if mine.fits:
        return None
    items = mine.footprint.items()
    biggest = max(items, key=items.get)
    head = (
        f"this config needs ~{gib(mine.footprint.total)} GiB per GPU, more than {HEADROOM:.0%} of the "
        f"{gpu.memory_gib:g} GiB of this {gpu.name} (the biggest item: {biggest} {gib(items[biggest])} GiB)"
    )
    fitting = [e for e in plan(cfg, hw) if e.fits]
    fix = (
        "; a layout that fits: " + " ".join(overrides(cfg, fitting[0].layout))
        if fitting
        else f"; no layout of {world} GPU(s) fits: use more GPUs or a smaller model"
    )
    return head + fix + f" (python -m train.plan for the table; {SKIP_ENV}=1 starts anyway)"


SKIP_ENV = "GPTRAIN_NO_PREFLIGHT"


def preflight_check(cfg: Config, mcfg, world: int, device) -> None:
    """Stop a CUDA run that the planner says cannot fit, before any step (TrainError, one line).
    Only on CUDA (other devices' memory is not the planner's model) and only for a GPU the table
    knows; GPTRAIN_NO_PREFLIGHT=1 skips it."""
    if device.type != "cuda" or os.environ.get(SKIP_ENV) == "1":
        return
    import torch

    from train.errors import TrainError
    from train.hardware import find_gpu

    gpu = find_gpu(torch.cuda.get_device_name(device))
    if gpu is None:
        return
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    gpu = dataclasses.replace(gpu, memory_gib=total)
    msg = preflight_message(dataclasses.replace(cfg, model=mcfg), world, gpu)
    if msg is not None:
        raise TrainError(msg)


# ----------------------------------------------------------------------------- output


def layout_name(lay: Layout) -> str:
    if lay.zero:
        return f"zero{lay.zero} x{lay.dp_size}"
    dims = [("rep", lay.dp_replicate), ("shard", lay.dp_shard), ("cp", lay.cp), ("tp", lay.tp), ("pp", lay.pp)]
    named = [f"{k}{v}" for k, v in dims if v > 1]
    return " ".join(named) or "single"


def overrides(cfg: Config, lay: Layout) -> list[str]:
    """The config keys that select this layout."""
    out = []
    if lay.zero:
        out += ["parallel.strategy=deepspeed", f"parallel.zero_stage={lay.zero}"]
    elif has_mesh(cfg) and (lay.cp > 1 or lay.tp > 1 or lay.pp > 1 or (lay.dp_replicate > 1 and lay.dp_shard > 1)):
        # every degree, so that no shorthand of the config's parallel.strategy fills one in differently
        out += [f"parallel.{k}={getattr(lay, k)}" for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp")]
    elif lay.dp_shard > 1:
        out.append("parallel.strategy=fsdp")
    elif lay.dp_replicate > 1:
        out.append("parallel.strategy=ddp")
    if lay.micro_batch != cfg.train.micro_batch:
        out.append(f"train.micro_batch={lay.micro_batch}")
    if lay.ac != cfg.train.activation_checkpointing:
        out.append(f"train.activation_checkpointing={str(lay.ac).lower()}")
    return out


def command(config_path: str, user_overrides: list[str], cfg: Config, est: Estimate, hw: Hardware) -> str:
    mine = overrides(cfg, est.layout)
    keys = {o.split("=", 1)[0] for o in mine}
    kept = [o for o in user_overrides if o.split("=", 1)[0] not in keys]  # the layout's value wins
    parts = ["bash launch.sh", f"--nproc {hw.gpus_per_node}", config_path, *kept, *mine]
    line = " ".join(parts)
    if hw.nodes > 1:
        line = f"NNODES={hw.nodes} NODE_RANK=<0..{hw.nodes - 1}> MASTER_ADDR=<node 0> MASTER_PORT=29500 " + line
    return line


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def table(ests: list[Estimate], hw: Hardware, top: int) -> str:
    head = (
        f"{'layout':<22} {'mb':>4} {'ac':>3} {'acc':>4} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} "
        f"{'temp':>7} {'total':>7} {'fits':>5} {'step ms':>9} {'tokens/s':>11} {'MFU':>6}"
    )
    lines = [head, "-" * len(head)]
    for e in ests[:top]:
        f = e.footprint
        lines.append(
            f"{layout_name(e.layout):<22} {e.layout.micro_batch:>4} {'on' if e.layout.ac else '-':>3} {e.accum:>4} "
            f"{gib(f.params):>7} {gib(f.grads):>7} {gib(f.optimizer):>7} {gib(f.activations):>7} "
            f"{gib(sum(f.temporaries.values())):>7} {gib(f.total):>7} {'yes' if e.fits else 'NO':>5} "
            f"{1000 * e.step_s:>9.1f} {e.tokens_per_s:>11,.0f} {100 * e.mfu:>5.1f}%"
        )
    return "\n".join(lines)


def detail(e: Estimate, hw: Hardware) -> str:
    f = e.footprint
    lines = [
        f"per rank, {layout_name(e.layout)}, micro-batch {e.layout.micro_batch}, checkpointing "
        f"{'on' if e.layout.ac else 'off'}, {e.accum} accumulation step(s):"
    ]
    for name, nbytes in f.items().items():
        note = f" (of which logits {gib(e.logits)})" if name == "activations" else ""
        note = f" (of which fp32 master {gib(f.master)})" if name == "optimizer" and f.master else note
        lines.append(f"  {name:<38} {gib(nbytes):>8} GiB{note}")
    lines.append(f"  {'total':<38} {gib(f.total):>8} GiB of {hw.gpu.memory_gib:g} GiB ({HEADROOM:.0%} usable)")
    for dim, (nbytes, seconds, where) in e.comm.items():
        lines.append(f"  comm {dim:<33} {nbytes / 1e9:>8.3f} GB/step over the {where}: {1000 * seconds:.1f} ms")
    return "\n".join(lines)
