"""DeepSpeed ZeRO stage 1, 2 and 3 (https://www.deepspeed.ai/tutorials/zero/): optimizer state
(1), plus gradients (2), plus parameters (3) partitioned across ranks; optional optimizer offload
to CPU (ZeRO-Offload). Needs the `deepspeed` extra: pip install -e '.[deepspeed]'.

The DeepSpeed config is built from ours (config_builder.py). The optimizer is the torch one that
the loop's build_optimizer returns (DeepSpeed wraps it); the returned optimizer is that torch
optimizer, so the loop sets its learning rate as usual -- it must never call its step() itself.

Gradient accumulation: the loop calls backward() on every micro-step and clip_and_step() once.
We mark the boundary explicitly (engine.set_gradient_accumulation_boundary(is_last) before each
backward, DeepSpeed's documented alternative to calling engine.step() per micro-step), so
engine.backward() reduces gradients only on the last micro-step and the single engine.step()
in clip_and_step() is the real optimizer step. engine.backward() divides the loss by the
configured gradient_accumulation_steps itself, so backward() does not divide again.

Checkpoints: engine.save_checkpoint into the state directory it is handed (each rank writes its
partition); train/checkpoint.py writes the consolidated fp32 model artifact from model_state_dict(), so
that eval/ opens DeepSpeed runs like any other. The engine reloads its own partitions only on the same
world size and ZeRO stage (resumes_natively); any other checkpoint (another world size, stage or
strategy) arrives as the strategy-neutral form (train/portable.py, which reads ZeRO partitions with
DeepSpeed's ds_to_universal) and load_portable sets it through DeepSpeed's tensor-fragment API.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from model.io import clean_state_dict
from train.parallel.parallelize import apply_ac_and_compile
from train.parallel.world import DistributedSetupError, DistributedStrategy, StrategyError, check_options
from train.strategies.config_builder import build_ds_config
from train.strategy import BuildOptimizer, StrategySpec, unwrap

TAG = "engine"  # one engine checkpoint per checkpoint directory


def _import_deepspeed(device: torch.device):
    """Import deepspeed with the accelerator matching our device (DS_ACCELERATOR is read once,
    on first use: https://www.deepspeed.ai/tutorials/accelerator-abstraction-interface/)."""
    want = "cpu" if device.type == "cpu" else "cuda"
    have = os.environ.setdefault("DS_ACCELERATOR", want)
    if have != want:
        raise DistributedSetupError(
            f"DS_ACCELERATOR={have} but the device is {device.type}; unset DS_ACCELERATOR or set it to {want}"
        )
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            f"parallel.strategy=deepspeed needs the deepspeed package ({e}); install it with "
            "pip install -e '.[deepspeed]', or choose parallel.strategy=fsdp"
        ) from None
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != want:
        raise DistributedSetupError(
            f"deepspeed was already set up for {get_accelerator().device_name()}, but "
            f"the device is {device.type}; set DS_ACCELERATOR={want} before starting"
        )
    return deepspeed


class DeepSpeedStrategy(DistributedStrategy):
    name = "deepspeed"

    def __init__(
        self,
        device: torch.device | str,
        spec: StrategySpec,
        zero_stage: int | None = None,
        deepspeed_config: str | None = None,
        offload_optimizer: bool = False,
        deepspeed: dict | None = None,
    ):
        self.ds = _import_deepspeed(torch.device(device))  # first: a missing package needs no launcher
        super().__init__(device, spec)
        # DeepSpeed wraps the torch process group we created (it does not make its own).
        self.ds.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        if not self.is_main:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # rank 0 alone logs
        self.zero_stage, self.config_path, self.offload_optimizer = zero_stage, deepspeed_config, offload_optimizer
        self.overrides = deepspeed or {}
        self.engine = self.optimizer = None
        self.ds_config: dict = {}
        self._is_last = True

    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        bare = unwrap(model)
        apply_ac_and_compile(bare, self.spec)
        self.ds_config = build_ds_config(
            path=self.config_path,
            overrides=self.overrides,
            zero_stage=self.zero_stage,
            offload_optimizer=self.offload_optimizer,
            grad_accum_steps=self.spec.grad_accum_steps,
            grad_clip=self.spec.grad_clip,
            precision=self.spec.precision,
            world_size=self.world_size,
            cuda=self.device.type == "cuda",
        )
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.optimizer = build_optimizer(bare)
        # dist_init_required=False: the process group exists (ours); DeepSpeed moves the module to
        # its device, casts it for bf16/fp16 and partitions as the stage says.
        self.engine, _, _, _ = self.ds.initialize(
            model=bare, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False
        )
        self.model = self.engine
        return self.engine, self.optimizer

    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        self._is_last = is_last  # the boundary is set in backward(), where DeepSpeed reads it
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.set_gradient_accumulation_boundary(self._is_last)
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself

    def clip_and_step(self) -> torch.Tensor:
        # The ZeRO optimizer clips with its clip_grad (from the config, and restored by
        # load_checkpoint); keep it equal to the spec's.
        max_norm = self.spec.grad_clip
        if getattr(self.engine.optimizer, "clip_grad", max_norm) != max_norm:
            self.engine.optimizer.clip_grad = max_norm
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # pre-clip global norm, computed inside step()
        if norm is None:
            return torch.tensor(float("nan"), device=self.device)
        return norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm), device=self.device)

    def zero_grad(self) -> None:
        # engine.step() already cleared the gradients at the boundary (ZeRO's own buffers included).
        return None

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights (the optimizer's master copy under bf16/fp16) on rank 0; collective.
        safe_get_full_fp32_param all-gathers ZeRO partitions (DeepSpeed's tensor-fragment API)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        full: dict[int, torch.Tensor] = {}
        names: dict[str, int] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in full:
                t = safe_get_full_fp32_param(p)
                if t is None:  # no optimizer mapping (frozen param): replicated under ZeRO 1/2
                    with self.ds.zero.GatheredParameters([p], enabled=self.zero_stage == 3):
                        t = p.detach().clone()
                full[id(p)] = t.detach().float().cpu() if self.is_main else torch.empty(0)
            names[name] = id(p)
        if not self.is_main:
            return {}
        out = {}
        for key, value in clean_state_dict(module.state_dict()).items():
            out[key] = full[names[key]] if key in names else value.detach().cpu()
        return out

    def save_state(self, state_dir: Path) -> dict:
        # Every rank writes its ZeRO partition; DeepSpeed pickles these files (docs/checkpoints.md).
        self.engine.save_checkpoint(str(state_dir), tag=TAG, save_latest=False)
        return {"world_size": self.world_size, "zero_stage": self.zero_stage}

    def resumes_natively(self, saved_strategy: str, saved: dict) -> bool:
        # ZeRO partitions are per rank and per stage: the engine's own load_checkpoint reads them only
        # on the same world size and stage; anything else goes through the neutral form.
        return (
            saved_strategy == "deepspeed"
            and saved.get("world_size") == self.world_size
            and saved.get("zero_stage") == self.zero_stage
        )

    def load_state(self, state_dir: Path, saved: dict, weights: Path | None) -> None:
        path, _ = self.engine.load_checkpoint(
            str(state_dir), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise StrategyError(f"DeepSpeed found no checkpoint under {state_dir}/{TAG}")

    def load_portable(self, portable) -> None:
        """Full fp32 weights and optimizer state by name, through DeepSpeed's tensor-fragment API
        (safe_set_full_fp32_param / safe_set_full_optimizer_state: each rank keeps its partition), for
        ZeRO 1, 2 and 3 alike and for any state key. Not the engine's load_universal path: its ZeRO-3
        loader restores only fp32/exp_avg/exp_avg_sq and copies group 0's hyperparameters onto every
        group (deepspeed/runtime/zero/stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3),
        which would put weight decay on the no-decay group."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        base = self.optimizer  # the torch optimizer under ZeRO: its groups now hold flat fp32 partitions
        if len(base.param_groups) != len(portable.param_groups):
            raise StrategyError(
                f"the saved optimizer has {len(portable.param_groups)} parameter groups, this one "
                f"{len(base.param_groups)}: resume with the optimizer settings that wrote the checkpoint"
            )
        step, sample = _step_and_keys(portable)
        # torch optimizers create their state lazily at the first step; ZeRO maps each parameter's
        # fragment onto it only then. Create it now (zeros, overwritten below) and link it. The flat
        # fp32 partitions: ZeRO 1/2 keep them in the groups, ZeRO-3 puts them there only during step().
        zero = self.engine.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or [
            flat for group in base.param_groups for flat in group["params"]
        ]
        for flat in flats:
            st = base.state[flat]
            for key, value in sample.items():
                if key not in st:
                    st[key] = torch.zeros_like(flat) if value.dim() else value.clone()
            if "step" in st:
                st["step"] = torch.full_like(torch.as_tensor(st["step"]), float(step))
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 (stage 3 looks up lazily)
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        for group, saved in zip(base.param_groups, portable.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for name, p in self.engine.module.named_parameters():
            name = next(iter(clean_state_dict({name: None})))
            value = portable.params[name].to(self.device)
            safe_set_full_fp32_param(p, value)  # the master copy
            for key, t in portable.state.get(name, {}).items():
                if t.dim():
                    safe_set_full_optimizer_state(p, t.to(self.device), key)
            # the (low-precision) module parameter the forward uses; ZeRO-3 re-partitions on exit
            with self.ds.zero.GatheredParameters([p], modifier_rank=0, enabled=self.zero_stage == 3):
                with torch.no_grad():
                    p.data.copy_(value.reshape(p.shape).to(p.dtype))

    def _release(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        self.engine = self.optimizer = None


def _step_and_keys(portable) -> tuple[float, dict[str, torch.Tensor]]:
    """The optimizer step (the same for every parameter) and one example of each state key."""
    sample: dict[str, torch.Tensor] = {}
    for st in portable.state.values():
        for k, v in st.items():
            sample.setdefault(k, v)
    step = sample.get("step", torch.tensor(0.0))
    return float(step), sample


def build(device: torch.device | str, spec: StrategySpec, **options) -> DeepSpeedStrategy:
    check_options("deepspeed", options)
    stage = options.get("zero_stage")
    return DeepSpeedStrategy(
        device,
        spec,
        zero_stage=None if stage is None else int(stage),
        deepspeed_config=options.get("deepspeed_config"),
        offload_optimizer=bool(options.get("offload_optimizer") or False),
        deepspeed=dict(options.get("deepspeed") or {}),
    )
