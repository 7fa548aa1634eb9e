"""`parallelize`: the model transforms of a torch-native layout, in place and in torchtitan's order
(torchtitan/models/llama3/infra/parallelize.py): tensor + sequence parallel (and loss parallel on the
vocabulary), activation checkpointing, per-block compile, then FSDP2 (HSDP with replicas) or DDP.
Pipeline parallel splits the blocks into stages first (train/parallel/pipeline.py) and hands each stage
here. Every transform keeps parameter names, so checkpoints name the bare GPT's parameters whatever the
layout: train/ac.py checkpoints inside each block's forward, nn.Module.compile() compiles in place, and
fully_shard / parallelize_module swap parameters for DTensors under the same names.

Tensor parallel (Shoeybi et al. 2019, Megatron-LM; sequence parallel: Korthikanti et al. 2022) on the
GPT of model/gpt.py:
    between blocks       activations are split along the sequence (Shard(1)); norms run on the slice
    attention            input all-gathered; c_attn column-parallel; c_proj row-parallel (reduce-scatter)
    MLP                  input all-gathered; c_fc column-parallel; c_proj row-parallel (reduce-scatter)
    embeddings           replicated; the first block takes its sequence slice (no communication)
    head                 column-parallel over the vocabulary with loss parallel (untied), or replicated
                         on the all-gathered hidden states (tied to the token table)
c_attn holds q, k and v in one matrix ([q heads | k heads | v heads]) and SwiGLU's c_fc holds [gate | up],
so a contiguous column shard mixes them: each rank's output columns are all-gathered over tp and the
rank keeps its own heads of q, k and v (its half of gate and up), which costs one all-gather of those
activations per layer beyond Megatron's plan and keeps the weights' layout (and the checkpoints) the
bare model's.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from train.fp8 import tp_styles
from train.parallel.expert import apply_moe, tp_plan
from train.strategy import StrategySpec


def apply_ac_and_compile(model: nn.Module, spec: StrategySpec) -> nn.Module:
    """Activation checkpointing, then torch.compile of each block: the transforms every engine shares
    (the other engine applies them before its own wrapping). Embeddings, final norm and head stay eager."""
    if spec.activation_checkpointing:
        from train.ac import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    if spec.compile:
        for block in model.transformer.h:
            block.compile()
    return model


def parallelize(model: nn.Module, dims, mesh, spec: StrategySpec, mp_policy=None, async_tp: bool = False) -> nn.Module:
    """Apply the layout of `dims` (train/parallel/dims.py) on `mesh` to the bare GPT (or one pipeline
    stage of it), in place. Returns the module the step calls: the model itself, or DDP's wrapper.
    async_tp: overlap the tp collectives with the matmuls in the compiled blocks (enable_async_tp)."""
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
        if async_tp:  # before the blocks compile: inductor reads the switch when it compiles them
            enable_async_tp(mesh["tp"])
    experts = apply_moe(model, dims, mesh)  # train/parallel/expert.py: MoE under ep and tp
    apply_ac_and_compile(model, spec)
    if dims.uses_fsdp:
        apply_fsdp(model, fsdp_mesh(dims, mesh), mp_policy, ignored=set(experts))
        return model
    if dims.dp_replicate > 1:
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers at construction, so ranks start equal.
        group = mesh["dp_replicate"].get_group()
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=group)
    return model


def fsdp_mesh(dims, mesh):
    """FSDP shards over dp_shard x cp; with replicas, HSDP's 2-D (replicate, shard) mesh. Without cp the
    plain dims serve (a flattened dim sliced from the root is on its way out of torch)."""
    shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"
    return mesh["dp_replicate", shard] if dims.dp_replicate > 1 else mesh[shard]


def apply_fsdp(model: nn.Module, mesh, mp_policy, ignored: set | None = None) -> None:
    """Bottom-up: one all-gather / reduce-scatter group per block, then the root group holding the
    embeddings, final norm and head. Shared parameters are managed once, so a tied lm_head stays the
    same (sharded) tensor as wte. `ignored`: parameters FSDP leaves alone (experts sharded over ep)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if ignored:
        kwargs["ignored_params"] = ignored
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    # The KV-cache decode step (model.generation.decode_step) calls these methods of the root, not its
    # forward: FSDP must gather the root's parameters (embeddings, final norm, head) for them too.
    for method in ("cached_trunk", "head"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)


# ----------------------------------------------------------------------------- tensor parallel


def uses_loss_parallel(model: nn.Module) -> bool:
    """Whether the head is split over the vocabulary: untied, no padded rows to drop, no soft-capping
    (the loss then runs on vocabulary shards under torch's loss_parallel)."""
    cfg, head = model.config, model.lm_head
    if head is None:  # a pipeline stage without the head
        return False
    tied = "wte" in model.transformer and head.weight is model.transformer.wte.weight
    return not tied and cfg.padded_vocab_size == cfg.vocab_size and cfg.logit_softcap is None


def apply_tp(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        SequenceParallel,
        parallelize_module,
    )

    tp, cfg = tp_mesh.size(), model.config
    blocks, parts = model.transformer.h, model.transformer
    if "wte" in parts and getattr(model, "is_first", True):  # a last pipeline stage may hold a tied table
        # the embeddings' output (B, T, C) is replicated: the first block keeps its slice of the sequence.
        # A later pipeline stage receives the previous stage's slice (B, T / tp, C) as it is.
        parallelize_module(
            blocks[0],
            tp_mesh,
            PrepareModuleInput(
                input_layouts=(Replicate(),) + (None,) * 4,  # block(x, rope, kv_update, attn_mask, is_causal)
                desired_input_layouts=(Shard(1),) + (None,) * 4,
                use_local_output=True,
            ),
        )
    for block in blocks:
        moe = not hasattr(block.mlp, "c_fc")  # a mixture of experts routes its slice (train/parallel/expert.py)
        # torch's styles, or torchao's float8 ones for tensorwise Float8Linear layers (train/fp8.py)
        col, row, prepare = tp_styles(block.attn.c_attn, block.attn.c_proj, tp_mesh)
        gathered = prepare(
            input_layouts=(Shard(1),) + (None,) * 5,
            desired_input_layouts=(Replicate(),) + (None,) * 5,
            use_local_output=True,
        )
        if not moe:
            mlp_col, mlp_row, mlp_prepare = tp_styles(block.mlp.c_fc, block.mlp.c_proj, tp_mesh)
            mlp = {
                "mlp": mlp_prepare(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
                ),
                "mlp.c_fc": mlp_col(),
                "mlp.c_proj": mlp_row(output_layouts=Shard(1)),
            }
        parallelize_module(
            block,
            tp_mesh,
            {
                "ln_1": SequenceParallel(),
                "attn": gathered,  # attn(x, rope, layer, kv_update, attn_mask, is_causal)
                "attn.c_attn": col(),
                "attn.c_proj": row(output_layouts=Shard(1)),
                "ln_2": SequenceParallel(),
                **(tp_plan() if moe else mlp),
            },
        )
        if hasattr(block.attn, "q_norm"):
            # q and k (B, H / tp, T, D) hold this rank's heads: the norm over head_dim needs no
            # communication; its gain, shared by every head, becomes a replicated DTensor whose gradient
            # (a partial sum over this rank's heads) is summed over tp
            heads = SequenceParallel(sequence_dim=1, use_local_output=True)
            parallelize_module(block.attn, tp_mesh, {"q_norm": heads, "k_norm": heads})
        attn = block.attn
        d = attn.head_dim
        sizes = [attn.n_head * d, attn.n_kv_head * d, attn.n_kv_head * d]
        attn.c_attn.register_forward_hook(_keep_own_parts(tp_mesh, sizes))
        attn.n_head, attn.n_kv_head = attn.n_head // tp, attn.n_kv_head // tp  # this rank's heads
        if not moe and block.mlp.swiglu:
            h = cfg.hidden_dim
            block.mlp.c_fc.register_forward_hook(_keep_own_parts(tp_mesh, [h, h]))
    if "ln_f" not in parts:  # a pipeline stage before the last: its output stays sequence-sharded
        return
    parallelize_module(parts.ln_f, tp_mesh, SequenceParallel())
    if uses_loss_parallel(model):
        head = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    else:  # the tied table stays whole: the head runs on the all-gathered hidden states
        head = PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        )
    parallelize_module(model.lm_head, tp_mesh, head)


def enable_async_tp(tp_mesh) -> None:
    """Async tensor parallel, as torchtitan's _maybe_enable_async_tp (torchtitan/distributed/compile.py)
    does it: register symmetric memory for the tp group and switch on inductor's micro-pipeline TP pass
    (torch/_inductor/fx_passes/micro_pipeline_tp.py), which decomposes each all-gather -> matmul and
    matmul -> reduce-scatter of the compiled graphs into per-rank chunks whose transfers overlap the
    chunks' matmuls (Wang et al. 2023, "Overlap communication with dependent computation via
    decomposition"). The switch is process-wide, as torch's config is. CUDA only: the fused kernels
    work on symmetric memory (train/parallel/dims.py's check_async_tp refuses other devices)."""
    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    with warnings.catch_warnings():
        # deprecated in recent torch; torchtitan still calls it until torch registers the group itself
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
    torch._inductor.config._micro_pipeline_tp = True


def _keep_own_parts(tp_mesh, sizes: list[int]):
    """A forward hook for a column-parallel projection whose output concatenates parts of `sizes`
    features ([q | k | v], [gate | up]): all-gather the columns over tp (differentiable; its backward is
    a reduce-scatter), then keep this rank's 1/tp of each part, in the same order."""
    from torch.distributed._functional_collectives import all_gather_single_autograd

    rank, n = tp_mesh.get_local_rank(), tp_mesh.size()

    def hook(module, inputs, out: torch.Tensor) -> torch.Tensor:  # out (B, T, sum(sizes) / tp)
        full = all_gather_single_autograd(out, out.dim() - 1, tp_mesh)  # (B, T, sum(sizes))
        return torch.cat([part.chunk(n, dim=-1)[rank] for part in full.split(sizes, dim=-1)], dim=-1)

    return hook
