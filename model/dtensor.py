"""Is this tensor a DTensor? Answered without importing torch.distributed.tensor.

Importing torch.distributed.tensor is a large share of every command's start-up (it pulls in sympy and
the symbolic-shape machinery), and a process that never builds a device mesh never holds a DTensor. So
the class is looked up only once its module is loaded; the code that makes DTensors (train/parallel/)
imports it for real.
"""

import sys

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
