"""FP8 training of the Linear layers through torchao's float8 (torchao.float8, the recipe torchtitan
uses: torchtitan/components/quantization/float8.py).

`convert` swaps each eligible nn.Linear of the bare GPT for torchao's Float8Linear: forward and both
backward matmuls cast their operands to float8 (e4m3; e5m2 for gradients under tensorwise) with
dynamic scales taken from each tensor's amax, and run on the GPU's fp8 tensor cores
(torch._scaled_mm). Weights, gradients and optimizer state stay in high precision: Float8Linear keeps
nn.Linear's parameter names and dtypes, so checkpoints and the model artifact are the plain model's
and eval/ reads them without torchao. Everything else (embeddings, norms, attention, the head) runs
in train.dtype.

Recipes (torchao's Float8LinearRecipeName):
    tensorwise  one scale per tensor; the fastest. Under FSDP2 the weights are cast to float8 before
                the all-gather (half of bf16's bytes on the wire) and the scales of all weights are
                computed in one all-reduce after each optimizer step (precompute_float8_dynamic_scale_for_fsdp).
    rowwise     one scale per row of each operand (per column where it is the right operand): closer
                to bf16's loss, slower; torchao all-gathers its weights in the high precision.

Which layers: torchtitan's filter. The head stays in high precision (its logits feed the loss, and
it is tied to the token table in GPT-2), the MoE router too (routing decisions), and so does every
Linear whose in or out features are not multiples of 16, the alignment torch._scaled_mm needs.

Tensor parallel: the plan of train/parallel/parallelize.py takes its styles from `tp_styles`. A
tensorwise Float8Linear gets torchao's float8 styles (torchao.float8.float8_tensor_parallel), which
cast the block's input to float8 before the sequence-parallel all-gather, so that gather moves float8,
and cast the output gradient to float8 in the backward (a Linear with a bias keeps the plain style,
see tp_styles); rowwise keeps torch's plain styles and gathers in high precision. Both as
torchtitan's apply_tp (enable_float8_tensorwise_tp, in torchtitan/models/llama3/parallelize.py
before its config-based sharding). A mesh that cannot move float8 (gloo) keeps the plain styles.

The conversion runs on the bare model before the layout's transforms (parallelize: tensor parallel,
compile, FSDP2), in torchtitan's order. Without fp8 tensor cores (compute capability 8.9+: Ada,
Hopper, Blackwell) a run is refused, unless train.fp8_emulate is set: torchao then emulates the fp8 matmuls in high
precision (same casts and scales, no speed-up), which is how the CPU tests exercise this path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

from train.errors import TrainError

RECIPES = ("tensorwise", "rowwise")
ALIGN = 16  # torch._scaled_mm needs both matmul dims divisible by 16 (torchtitan's filter)
SKIP = ("lm_head", "router")  # module names kept in high precision (the last part of their fqn)
FP8_CAPABILITY = (8, 9)  # the first CUDA compute capability with fp8 tensor cores (Ada)


def check_device(device: torch.device, emulate: bool) -> None:
    """Refuse (one line) a device without fp8 tensor cores, unless torchao's emulation is asked for."""
    if emulate:
        return
    if device.type != "cuda":
        raise TrainError(
            f"train.fp8 needs a GPU with fp8 tensor cores (CUDA compute capability 8.9+: Ada, Hopper, "
            f"Blackwell), but this run is on {device.type}; set train.fp8=none, or train.fp8_emulate=true "
            "to run torchao's emulation (no speed-up, for checking the code path)"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        raise TrainError(
            f"train.fp8 needs fp8 tensor cores (compute capability 8.9+), but {torch.cuda.get_device_name(device)} "
            f"is {cap[0]}.{cap[1]}; set train.fp8=none (train.dtype=bfloat16 is this GPU's fastest)"
        )


def peak_dtype(train) -> str:
    """The dtype whose peak a run's MFU is measured against (a TrainSection): fp8's where the matmuls
    run on fp8 units; an emulated run computes in train.dtype, so that is its peak."""
    return "float8" if train.fp8 != "none" and not train.fp8_emulate else train.dtype


def keep_linear(module: nn.Module, fqn: str) -> bool:
    """torchao's module_filter_fn: True for the Linear layers that run in fp8."""
    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] in SKIP:
        return False
    return module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0


def float8_config(recipe: str, emulate: bool, fsdp: bool):
    """torchao's Float8LinearConfig for a recipe; fp8 all-gather where FSDP2 shards and the recipe allows."""
    try:
        from torchao.float8 import Float8LinearConfig
    except ImportError:
        raise TrainError(
            "train.fp8 needs torchao: pip install -e '.[fp8]' (or pip install torchao), or set train.fp8=none"
        ) from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise")


def convert(model: nn.Module, recipe: str, emulate: bool, fsdp: bool) -> tuple[int, Callable[[], None] | None]:
    """Swap the eligible Linear layers of `model` for Float8Linear, in place. Returns (layers
    converted, the hook to call after each optimizer step, or None): with fp8 all-gather, the hook
    computes the next step's weight scales in one all-reduce, as torchtitan's post-optimizer hook."""
    from torchao.float8 import convert_to_float8_training, precompute_float8_dynamic_scale_for_fsdp

    config = float8_config(recipe, emulate, fsdp)
    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=keep_linear, config=config)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    if converted == 0:
        raise TrainError(
            f"train.fp8={recipe}: none of the model's {before} Linear layers has in and out features that are "
            f"multiples of {ALIGN}; choose n_embd and the MLP width as multiples of {ALIGN}, or set train.fp8=none"
        )
    if not config.enable_fsdp_float8_all_gather:
        return converted, None
    return converted, lambda: precompute_float8_dynamic_scale_for_fsdp(model)


def is_tensorwise(module: nn.Module) -> bool:
    """Whether `module` is a Float8Linear with one dynamic scale per tensor (the tensorwise recipe)."""
    if type(module).__name__ != "Float8Linear":
        return False
    from torchao.float8.config import ScalingGranularity

    return module.config.cast_config_input.scaling_granularity is ScalingGranularity.TENSORWISE


def float8_collectives(mesh) -> bool:
    """Whether the mesh's collectives move float8 tensors: NCCL does; gloo (the CPU's backend) has no
    float8 dtypes."""
    return mesh.device_type == "cuda"


def tp_styles(colwise: nn.Module, rowwise: nn.Module, mesh) -> tuple[type, type, type]:
    """The tensor-parallel style classes (ColwiseParallel, RowwiseParallel, PrepareModuleInput) for a
    column-parallel Linear `colwise`, the row-parallel Linear `rowwise` after it, and the input of the
    module holding both (attention, MLP), whose all-gather over `mesh` feeds `colwise`.

    The input gets torchao's float8 style where `colwise` is a tensorwise Float8Linear: the input is
    cast before the all-gather, and the Linear takes it as it comes. A Linear gets torchao's float8
    style where it is a tensorwise Float8Linear without a bias: those styles cast the gradient of the
    layer's output, bias included, to float8, so a bias would learn from the rounded gradient; with a
    bias (the GPT-2 family) the plain style lets Float8Linear cast only its matmul's operands, as in a
    one-process run. torchtitan's models have no biases. torchao's styles refuse other modules.
    Where the mesh cannot move float8 (gloo: an emulated run on CPUs), every style is the plain one:
    the same casts with the same scales (torchao reduces each amax over the shards), after the gather."""
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    col, row, prepare = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    if float8_collectives(mesh) and (is_tensorwise(colwise) or is_tensorwise(rowwise)):
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        if is_tensorwise(colwise):
            prepare = PrepareFloat8ModuleInput
            col = Float8ColwiseParallel if colwise.bias is None else col
        if is_tensorwise(rowwise) and rowwise.bias is None:
            row = Float8RowwiseParallel
    return col, row, prepare
