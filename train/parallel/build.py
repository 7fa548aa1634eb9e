"""make_strategy: the one place that turns the config's parallel section into a Strategy.

Kept apart from the Strategy base class (train/strategy.py) and from the engines it builds, so that
the base class imports none of its implementations. Engines are imported lazily: one process needs
neither a pipeline schedule nor the deepspeed package.
"""

from __future__ import annotations

import torch

from train.config import STRATEGIES
from train.parallel.dims import ParallelDims
from train.parallel.world import check_options, env_world, parse_dtype
from train.strategy import Strategy, StrategySpec


def make_strategy(name: str, device: torch.device | str, spec: StrategySpec | None = None, **options) -> Strategy:
    """The strategy that `parallel.strategy` (none | ddp | fsdp | deepspeed) and the mesh degrees in the
    parallel section's options name, built from the frozen spec: DeepSpeed's engine, or the device mesh
    of this world (a pipeline over it when pp > 1)."""
    spec = spec if spec is not None else StrategySpec()
    if name == "deepspeed":
        from train.strategies import deepspeed

        return deepspeed.build(device, spec, **options)
    if name not in STRATEGIES:
        raise ValueError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    check_options(name, options)
    rank, _, world_size = env_world()
    dims = ParallelDims.from_options(name, options, world_size, rank)
    if dims.pp > 1:
        from train.parallel.pipeline_strategy import PipelineStrategy as cls

        extra = {"schedule": options.get("pp_schedule") or "1F1B"}
    else:
        from train.parallel.mesh_strategy import MeshStrategy as cls

        extra = {}
    return cls(
        dims,
        device,
        spec,
        label=name,
        param_dtype=parse_dtype(options.get("fsdp_param_dtype"), "fsdp_param_dtype"),
        reduce_dtype=parse_dtype(options.get("fsdp_reduce_dtype", "fp32"), "fsdp_reduce_dtype"),
        async_tp=bool(options.get("async_tp")),
        **extra,
    )
