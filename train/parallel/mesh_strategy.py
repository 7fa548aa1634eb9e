"""The torch-native engine: one Strategy for every layout of the device mesh (train/parallel/dims.py):
one process, DDP, FSDP2, HSDP, tensor parallel, and the context / pipeline dimensions that
train/parallel/context.py and train/parallel/pipeline.py add through the hooks marked below.

Checkpoints: every rank writes its part of model + optimizer with torch.distributed.checkpoint (DCP)
into the state directory it is handed, from get_state_dict's fully-qualified names (the bare GPT's,
whatever the layout), so DCP reshards on load and a checkpoint of any mesh resumes on any other mesh
and world size. The fp16 loss scale travels in train_state.pt. A checkpoint that DCP cannot read
(the other engine's, or one whose optimizer state sits in train_state.pt) arrives as the strategy-neutral
form (train/portable.py): load_portable.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from model.dtypes import torch_dtype
from model.generation import Decoder, WindowDecoder
from model.io import clean_state_dict
from train.parallel.context import ContextParallel, ContextParallelEval
from train.parallel.dims import DIMS, ParallelDims, check_async_tp
from train.parallel.expert import sync_moe_grads
from train.parallel.parallelize import parallelize, uses_loss_parallel
from train.parallel.world import (
    DistributedStrategy,
    StrategyError,
    broadcast_module_,
)
from train.strategy import BuildOptimizer, StrategySpec, unwrap

# Gathering a tensor sharded over two mesh dims (FSDP x tp: checkpoints, Muon) warns on every call
# that it takes two all-gathers; that is the expected cost here.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

DCP_FORMAT = "dcp"  # strategy_state["format"]: model + optimizer are DCP shards in state/


class MeshStrategy(DistributedStrategy):
    """The Strategy of every mesh layout. Hooks for the dimensions that change the step (each a method
    a subclass overrides): `parallelize` (pipeline parallel: per stage), `forward_backward` (pipeline
    parallel: its schedule over all micro-batches), `micro_loss` (context parallel: the sequence shard),
    `eval_model` / `sample_decoder` (what evaluation and sampling call)."""

    def __init__(
        self,
        dims: ParallelDims,
        device: torch.device | str,
        spec: StrategySpec,
        label: str = "none",
        param_dtype: torch.dtype | None = None,
        reduce_dtype: torch.dtype | None = torch.float32,
        async_tp: bool = False,
    ):
        self.dims, self.spec = dims, spec
        if async_tp:  # a user error needs no process group
            check_async_tp(dims.tp, spec.compile, torch.device(device).type)
        self.async_tp = async_tp
        pure = {"none": "1", "ddp": f"dp_replicate={dims.world_size}", "fsdp": f"dp_shard={dims.world_size}"}
        # what train_state.pt records: the shorthand when the layout is just that, "mesh" otherwise
        self.name = label if pure.get(label) == dims.describe() or dims.world_size == 1 else "mesh"
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        # first: a precision error needs no process group
        self.mp_policy = self.mixed_precision() if dims.uses_fsdp or label == "fsdp" else None
        if spec.precision == "fp16" and dims.shards_params:
            raise StrategyError(
                f"parallel layout {dims.describe()} runs in bfloat16 or float32 (float16 needs a loss scaler "
                "over sharded gradients): set train.dtype=bfloat16, or use parallel.strategy=ddp for float16"
            )
        super().__init__(device, spec, alone=dims.world_size == 1 and label == "none")
        self.weights_in_state = dims.shards_params
        self.mesh = None
        self.bare: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = torch.amp.GradScaler(self.device.type) if spec.precision == "fp16" else None
        self.loss_parallel = False
        self.cp = None  # ContextParallel of this rank's cp group, when cp > 1

    # ---- building ---------------------------------------------------------------------
    def wrap(self, model: nn.Module, build_optimizer: BuildOptimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        bare = unwrap(model)
        meta = any(p.is_meta for p in bare.parameters())
        if not meta:
            bare.to(self.device)
            if self.world_size > 1:  # sharding keeps each rank's own values: start from rank 0's weights
                broadcast_module_(bare)
        if self.world_size > 1:
            self.mesh = self.dims.build_mesh(self.device.type)
        self.loss_parallel = self.dims.tp > 1 and uses_loss_parallel(bare)
        if self.dims.cp > 1:
            self.cp = ContextParallel(bare.config, self.mesh["cp"])
        self.model = self.parallelize(bare)
        if meta:
            # A model built on the meta device (big models): materialise only the local shards, then
            # initialise them (DTensor random ops keep the init consistent across ranks).
            bare.to_empty(device=self.device)
            bare.init_weights()
        self.bare = bare
        self.optimizer = build_optimizer(bare)  # over the (DTensor) parameters, bare names
        return self.model, self.optimizer

    def parallelize(self, bare: nn.Module) -> nn.Module:
        """Hook (pipeline parallel): the layout's transforms on the model, or on each stage of it."""
        return parallelize(bare, self.dims, self.mesh, self.spec, self.mp_policy, self.async_tp)

    def mixed_precision(self):
        """bf16 parameters for compute, fp32 gradient reduction (torchtitan's default policy); the
        sharded parameters and the optimizer state stay fp32. parallel.fsdp_param_dtype unset
        follows the loop's precision (train.dtype)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = self.spec.precision
        param_dtype = self.param_dtype if self.param_dtype is not None else torch_dtype(precision)
        if param_dtype == torch.float32:
            param_dtype = None  # no cast at all
        if param_dtype == torch.float16 or precision == "fp16":
            # float16 needs loss scaling, which sharded gradients do not get here (torchtitan neither).
            raise StrategyError(
                "parallel.strategy=fsdp runs in bfloat16 or float32: set train.dtype=bfloat16 "
                "(and parallel.fsdp_param_dtype to bfloat16 or null), or use parallel.strategy=ddp "
                "for float16 with loss scaling"
            )
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=self.reduce_dtype)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype FSDP casts the parameters to for the forward (the blocks compute in it), or None."""
        return self.mp_policy.param_dtype if self.mp_policy is not None else None

    # ---- the step ---------------------------------------------------------------------
    def sync_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            # gradients accumulate locally; the last micro-step's backward all-reduces the sum
            return contextlib.nullcontext() if is_last else self.model.no_sync()
        if self.dims.uses_fsdp:
            # FSDP2's no_sync: no reduce-scatter on non-last micro-steps
            self.bare.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Forward and backward of a loss over vocabulary-sharded logits (torch's loss_parallel)."""
        if not self.loss_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def forward_backward(self, micro_batches, amp):
        """Hook (pipeline parallel replaces it with its schedule over all micro-batches)."""
        with self.loss_context():
            loss = super().forward_backward(micro_batches, amp)
        return loss.full_tensor() if isinstance(loss, DTensor) else loss  # loss parallel: a replicated DTensor

    def micro_loss(self, x, y, amp):
        """One micro-batch's mean loss; under context parallel over this rank's chunks of each window
        (FSDP then averages the gradients over dp x cp)."""
        with amp:
            loss = self.model(x, y) if self.cp is None else self.cp.loss(self.model, x, y)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.spec.grad_accum_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_and_step(self, gate=None) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        sync_moe_grads(self.bare)  # expert / tensor parallel MoE blocks (train/parallel/expert.py)
        params = [p for p in self.bare.parameters() if p.grad is not None]
        groups = group_by_mesh(params)
        norm = grad_norm(groups)
        if gate is not None and not gate(norm):  # train/guard.py: skip this update on every rank
            if self.scaler is not None:
                self.scaler.update()  # closes the unscale_ above; the scale stays as it was
            return norm
        if self.spec.grad_clip > 0:
            for group in groups:
                torch.nn.utils.clip_grads_with_norm_(group, self.spec.grad_clip, norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eval_model(self) -> nn.Module:
        """Hook (pipeline / context parallel): what evaluation calls. Under loss parallel the logits
        come back whole and the loss as a plain tensor."""
        model = _Gathered(self.model, self) if self.loss_parallel else self.model
        return model if self.cp is None else ContextParallelEval(model, self.cp)

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    def layout(self) -> dict:
        out = {**super().layout(), **{d: getattr(self.dims, d) for d in DIMS}, "coords": self.dims.coords()}
        if self.dims.ep > 1:  # expert parallel, a split of dp_shard x cp: shown after the mesh's own dims
            out["ep"], out["coords"]["ep"] = self.dims.ep, self.dims.ep_rank
        return out

    def sample_decoder(self) -> Decoder:
        if self.dims.tp > 1:
            # sequence parallel splits a window's positions between the tp ranks, which one decoded
            # token cannot be: every step runs the whole window, whole logits out (eval_model)
            return WindowDecoder(self.eval_model(), self.bare.config.block_size, multiple=self.dims.tp)
        return self.cached_decoder(self.bare)

    # ---- checkpoints ------------------------------------------------------------------
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if not self.dims.shards_params:
            return clean_state_dict(self.bare.state_dict()) if self.is_main else {}
        # Collective: every rank all-gathers; only rank 0 keeps the full (CPU) tensors.
        return get_model_state_dict(self.bare, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def state_dicts(self) -> tuple[dict, dict]:
        """Hook (pipeline parallel): the model and optimizer state dicts that DCP saves."""
        return get_state_dict(self.bare, self.optimizer)

    def save_state(self, state_dir: Path) -> dict:
        model_sd, optim_sd = self.state_dicts()
        with _one_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(state_dir))
        return self._saved_meta()

    def save_state_async(self, state_dir: Path, process_group) -> tuple[dict, Future | None]:
        # dcp.async_save copies the state to CPU memory (its DefaultStager) before it returns, then writes
        # in a thread; its cross-rank steps run on `process_group`, a gloo group of their own, so that they
        # never interleave with the training step's collectives (torchtitan's checkpoint.py does the same).
        model_sd, optim_sd = self.state_dicts()
        future = dcp.async_save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(state_dir),
            process_group=process_group,
            no_dist=not dist.is_initialized(),
        )
        return self._saved_meta(), future

    def _saved_meta(self) -> dict:
        """Rank 0's part of train_state.pt: how the DCP shards were written."""
        groups = [g.get("name") for g in self.optimizer.param_groups]
        out = {"format": DCP_FORMAT, "mesh": self.dims.describe(), "param_groups": groups}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out if self.is_main else {}

    def load_state(self, state_dir: Path, saved: dict, weights: Path | None) -> None:
        # get_state_dict gives the current layout; DCP reads into it, resharding from whatever mesh
        # wrote the checkpoint (torchtitan's checkpoint.py does the same).
        groups = [g.get("name") for g in self.optimizer.param_groups]
        if saved.get("param_groups", groups) != groups:  # another optim.name (or a changed split)
            raise StrategyError(
                f"cannot resume from {state_dir.parent}: its optimizer state does not fit this optimizer "
                f"(parameter groups {saved['param_groups']} saved, {groups} here); resume with the optim.name "
                f"it was written with, or start from its weights with train.init_from={state_dir.parent}"
            )
        model_sd, optim_sd = get_state_dict(self.bare, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _one_process_quiet():
            dcp.load(state, checkpoint_id=str(state_dir))
        set_state_dict(self.bare, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])

    def resumes_natively(self, saved_strategy: str, saved: dict) -> bool:
        # DCP shards: this engine's (and an fsdp checkpoint's, whose state dict was empty)
        return saved.get("format") == DCP_FORMAT or (saved_strategy == "fsdp" and not saved)

    def load_portable(self, portable) -> None:
        # Every rank hands the full tensors; set_*_state_dict(full_state_dict=True) keeps each rank's
        # part of them. A tied head is the token table's entry. The GPT has no persistent buffers
        # (RoPE tables are non-persistent): parameters are the state. The fp16 loss scale starts afresh.
        canonical = {id(p): n for n, p in self.bare.named_parameters()}  # a shared one's first name
        full = {n: portable.params[canonical[id(p)]] for n, p in self.bare.named_parameters(remove_duplicate=False)}
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.bare, full, options=options)
        set_optimizer_state_dict(self.bare, self.optimizer, portable.optimizer_state_dict(), options=options)

    def _release(self) -> None:
        self.model = self.bare = self.optimizer = self.mesh = self.cp = None


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class _Gathered(nn.Module):
    """model(x) -> whole logits, model(x, y) -> plain mean loss, for a head split over the vocabulary."""

    def __init__(self, model: nn.Module, strategy: MeshStrategy):
        super().__init__()
        self.inner = model
        self._strategy = [strategy]  # a list: not registered as a submodule

    def forward(self, *args, **kwargs):
        with self._strategy[0].loss_context():
            out = self.inner(*args, **kwargs)
        return out.full_tensor() if isinstance(out, DTensor) else out


def group_by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters grouped by where they live (plain, or a DTensor's mesh): foreach kernels and DTensor
    reductions take one kind at a time."""
    groups: dict = {}
    for p in params:
        groups.setdefault(id(p.device_mesh) if isinstance(p, DTensor) else None, []).append(p)
    return list(groups.values())


def grad_norm(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """The global L2 norm of the gradients over every mesh dimension: a DTensor group's norm is a
    partial result that full_tensor() reduces (torchtitan's dist_utils.clip_grad_norm_)."""
    norms = []
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, False, True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        return norms[0]
    return torch.stack([n.float() for n in norms]).square().sum().sqrt()
