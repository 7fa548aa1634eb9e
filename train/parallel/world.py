"""The process group and what every distributed strategy shares: the one reader of torchrun's
environment, process-group init/teardown, the loop's collectives, option checking.

Process groups follow torchrun's environment contract (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT; https://pytorch.org/docs/stable/elastic/run.html): NCCL with one GPU per process
(cuda:LOCAL_RANK) on CUDA, gloo on CPU.
"""

from __future__ import annotations

import difflib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from model.dtypes import torch_dtype
from train.errors import TrainError
from train.strategy import Strategy, StrategySpec

# Every field of the config's `parallel` section; each strategy reads the ones it uses and
# ignores the others (they carry defaults), so one config file works with every strategy.
KNOWN_OPTIONS = frozenset(
    {
        "strategy",
        "fsdp_param_dtype",
        "fsdp_reduce_dtype",
        "zero_stage",
        "deepspeed_config",
        "offload_optimizer",
        "deepspeed",
        "dp_replicate",
        "dp_shard",
        "tp",
        "cp",
        "ep",
        "pp",
        "pp_schedule",
        "pp_stages_per_rank",
        "async_tp",
    }
)


class DistributedSetupError(TrainError):
    """A distributed run that cannot start as launched (environment, devices); says what to do.
    It may concern one rank only, so every rank that raises it reports it (train/__main__.py)."""

    every_rank_reports = True


class StrategyError(TrainError, ValueError):
    """A user-fixable problem with the parallel options, the DeepSpeed config or a checkpoint.
    A TrainError, so `python -m train` prints its one line instead of a traceback."""


def check_options(strategy: str, options: dict) -> None:
    """Reject option names that no strategy knows, with the closest valid name as a hint."""
    for key in options:
        if key not in KNOWN_OPTIONS:
            hint = difflib.get_close_matches(key, KNOWN_OPTIONS, n=1)
            did_you_mean = f" (did you mean parallel.{hint[0]}?)" if hint else ""
            raise StrategyError(
                f"unknown option parallel.{key} for strategy {strategy!r}{did_you_mean}; "
                f"valid options: {', '.join(sorted(KNOWN_OPTIONS))}"
            )


def parse_dtype(value: str | torch.dtype | None, field: str) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / 'fp32' / ... -> torch dtype; None stays None (keep the param dtype)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return torch_dtype(value)
    except ValueError:
        raise StrategyError(f"parallel.{field}={value!r}: use one of bf16, fp16, fp32 (or null)") from None


@dataclass
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device  # this rank's device: cuda:LOCAL_RANK or cpu
    owns_group: bool  # True when we created the process group, so teardown destroys it


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when run alone. The one
    place that reads RANK / LOCAL_RANK / WORLD_SIZE (https://pytorch.org/docs/stable/elastic/run.html)."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    return tuple(_env_int(k) if k in os.environ else (1 if k == "WORLD_SIZE" else 0) for k in keys)


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def init_distributed(device: torch.device | str, strategy: str, timeout_s: float = 1800.0) -> World:
    """Join (or create) the default process group from torchrun's environment.

    A group that already exists (a launcher or a test driver made it) is reused and left alone
    at teardown; otherwise we create it and own it."""
    device = torch.device(device)
    needed = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing and not dist.is_initialized():
        raise DistributedSetupError(
            f"parallel.strategy={strategy} needs a launcher that sets {', '.join(missing)}: start it with "
            f"`torchrun --nproc_per_node=N -m train ...` (or launch.sh), or use parallel.strategy=none "
            "for one process"
        )
    rank, local_rank, world_size = (
        env_world() if not missing else (dist.get_rank(), dist.get_rank(), dist.get_world_size())
    )
    if not 0 <= rank < world_size:
        raise DistributedSetupError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher's settings")

    if device.type == "cuda":
        # One GPU per process (torchrun's convention); set_device before any CUDA work so that
        # NCCL and every default-device allocation land on this rank's GPU.
        if not torch.cuda.is_available():
            raise DistributedSetupError("device is cuda but CUDA is not available; set the device to cpu")
        n_gpu = torch.cuda.device_count()
        if local_rank >= n_gpu:
            raise DistributedSetupError(
                f"LOCAL_RANK={local_rank} but this node has {n_gpu} visible GPU(s): start at most "
                f"{n_gpu} processes per node (torchrun --nproc_per_node={n_gpu})"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedSetupError(f"parallel.strategy={strategy} runs on cuda or cpu, not {device.type}")

    owns = False
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}  # eager NCCL init, bound to this GPU
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        owns = True
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise DistributedSetupError(
            f"the process group has rank {dist.get_rank()} of {dist.get_world_size()} but the environment says "
            f"RANK={rank} WORLD_SIZE={world_size}; launch every rank with the same torchrun command"
        )
    return World(rank, local_rank, world_size, device, owns)


class DistributedStrategy(Strategy):
    """Common part of the native mesh and deepspeed: the process group, the collectives and
    teardown. alone=True: one process, no process group (the collectives are identities)."""

    name = "distributed"

    def __init__(self, device: torch.device | str, spec: StrategySpec, alone: bool = False):
        super().__init__(device, spec)
        self.world = World(0, 0, 1, torch.device(device), False) if alone else init_distributed(device, self.name)
        self.rank, self.local_rank = self.world.rank, self.world.local_rank
        self.world_size, self.device = self.world.world_size, self.world.device
        self._torn_down = False

    # ---- collectives ------------------------------------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """t on a device the backend can reduce (NCCL: this rank's GPU)."""
        return t if t.device == self.device else t.to(self.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return t
        buf = self._comm(t)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
        return t

    def any_flag(self, flag: bool) -> bool:
        # MAX over ranks: one rank's SIGTERM makes every rank stop (and save) at the same step.
        if not dist.is_initialized():
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # ---- shutdown ---------------------------------------------------------------------
    def _release(self) -> None:
        """Drop references to the wrapped model / optimizer / engine (subclasses)."""

    def teardown(self) -> None:
        """Idempotent; safe on error paths (no collective). Wrapped objects hold gloo/NCCL
        resources (DDP's reducer, FSDP's comm buffers): free them before the group goes, or a
        gloo process can abort at interpreter exit."""
        if self._torn_down:
            return
        self._torn_down = True
        self._release()
        gc.collect()
        if self.world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank src's, in place (DDP does this at
    construction; FSDP2 does not, and the loop seeds each rank differently for dropout)."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=src)
