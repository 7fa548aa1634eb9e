"""Activation checkpointing applied from outside the model (torchtitan's apply_ac, per block).

Each transformer block keeps only its input in the forward and recomputes its activations in the
backward (Chen et al. 2016), trading ~1/3 more compute for memory that no longer grows with depth.
The block's forward is replaced on the instance, so parameter names -- and therefore checkpoints --
are unchanged (a checkpoint_wrapper module would add `_checkpoint_wrapped_module.` to every key).
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every block of model.transformer.h; returns how many were wrapped."""
    blocks = model.transformer.h
    for block in blocks:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            # use_reentrant=False: works with kwargs, torch.compile and FSDP2, and preserve_rng_state
            # (the default) replays the same dropout masks in the recomputation.
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)
