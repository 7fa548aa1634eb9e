"""The DeepSpeed config (https://www.deepspeed.ai/docs/config-json/) built from ours.

Layers, later ones on top: a DeepSpeed JSON file (parallel.deepspeed_config), the free-form
parallel.deepspeed dict, then the values our config owns: zero stage, optimizer offload,
precision, gradient accumulation and clipping. A value set in both places that disagrees is an
error (one clear message), never a silent override. The optimizer and LR schedule come from the
training config, so the DeepSpeed config must not define them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from train.parallel.world import StrategyError

QUIET_STEPS = 2**31 - 1  # steps_per_print: the loop logs, not DeepSpeed


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _set(section: dict, key: str, value, ours: str, theirs: str) -> None:
    if key in section and section[key] != value:
        raise StrategyError(
            f"{ours}={value!r} but the DeepSpeed config sets {theirs}={section[key]!r}; "
            f"make them agree or remove {theirs} from the DeepSpeed config"
        )
    section[key] = value


def load_json(path: str | Path) -> dict:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise StrategyError(
            f"parallel.deepspeed_config: {p} not found; give the path of a DeepSpeed JSON config, or null"
        ) from None
    except json.JSONDecodeError as e:
        raise StrategyError(f"parallel.deepspeed_config: {p} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise StrategyError(f"parallel.deepspeed_config: {p} must hold a JSON object")
    return doc


def build_ds_config(
    *,
    path: str | Path | None,
    overrides: dict,
    zero_stage: int | None,
    offload_optimizer: bool,
    grad_accum_steps: int,
    grad_clip: float,
    precision: str,
    world_size: int,
    cuda: bool,
) -> dict:
    cfg = _merge(load_json(path) if path else {}, overrides or {})
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise StrategyError(
                f"the DeepSpeed config defines {key!r}; the optimizer and learning-rate schedule "
                f"come from the training config (optim section): remove {key!r}"
            )

    zero = cfg.setdefault("zero_optimization", {})
    stage = zero_stage if zero_stage is not None else zero.get("stage", 2)
    if stage not in (1, 2, 3):
        raise StrategyError(
            f"parallel.zero_stage={stage!r}: DeepSpeed runs here with ZeRO stage 1, 2 or 3 "
            "(stage 0 is plain data parallelism: use parallel.strategy=ddp)"
        )
    _set(zero, "stage", stage, "parallel.zero_stage", "zero_optimization.stage")
    if offload_optimizer:
        off = zero.setdefault("offload_optimizer", {})
        _set(off, "device", "cpu", "parallel.offload_optimizer", "zero_optimization.offload_optimizer.device")
        off.setdefault("pin_memory", cuda)
    # We hand DeepSpeed a torch optimizer (the loop's AdamW with its weight-decay groups); with
    # offload DeepSpeed would otherwise insist on its own CPU Adam.
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)

    if precision not in ("fp32", "bf16", "fp16"):
        raise StrategyError(f"precision {precision!r}: use fp32, bf16 or fp16")
    if precision in ("bf16", "fp16"):
        name = "bf16" if precision == "bf16" else "fp16"
        section = cfg.setdefault(name, {})
        _set(section, "enabled", True, f"the training precision {precision}", f"{name}.enabled")
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise StrategyError("the DeepSpeed config enables both bf16 and fp16; enable one")

    # The loop owns accumulation and clipping; DeepSpeed needs them at initialisation.
    _set(
        cfg,
        "gradient_accumulation_steps",
        int(grad_accum_steps),
        "the loop's gradient accumulation",
        "gradient_accumulation_steps",
    )
    _set(cfg, "gradient_clipping", float(grad_clip), "the loop's grad_clip", "gradient_clipping")
    # Batch sizes are bookkeeping for DeepSpeed here (our loader feeds the engine), but it checks
    # train_batch_size == micro * accumulation * world size.
    micro = cfg.setdefault("train_micro_batch_size_per_gpu", 1)
    _set(
        cfg,
        "train_batch_size",
        micro * int(grad_accum_steps) * world_size,
        "train_micro_batch_size_per_gpu x gradient accumulation x world size",
        "train_batch_size",
    )
    cfg.setdefault("steps_per_print", QUIET_STEPS)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
