"""Where and in what precision a run trains: the device of this rank, train.dtype=auto, autocast."""

from __future__ import annotations

import contextlib

import torch

from model.dtypes import torch_dtype
from train.errors import TrainError


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU when CUDA is present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"train.device={spec} but CUDA is not available here; use train.device=cpu (or auto)")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise TrainError("train.device=mps but MPS is not available here; use train.device=cpu (or auto)")
    return torch.device("cuda", local_rank) if spec == "cuda" else torch.device(spec)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here; without them torch falls back to slow reference ones."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False  # unknown: assume the common case (no bf16 units)


def resolve_dtype(device: torch.device) -> str:
    """train.dtype=auto: the fastest precision this device trains in without surprises."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


def autocast_ctx(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast (weights and optimizer stay fp32), or nothing for fp32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(dtype))
