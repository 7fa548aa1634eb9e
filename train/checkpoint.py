"""Checkpoints in the run directory (layout in ../shared/DESIGN.md):

    RUN/checkpoints/
        step_000500/          written as .tmp-step_000500/, then renamed: never half a checkpoint
            model/            the model artifact (strategy.save; dcp/ or deepspeed/ when sharded)
            train_state.pt    optimizer + extra state (step, loader, RNG, config), weights_only-loadable
            rng_rank00001.pt  each other rank's RNG states, when world_size > 1
        latest                the name of the newest complete checkpoint (replaced atomically)
        best -> step_...      the best by val loss (a relative symlink, replaced atomically)

A crash at any point of a save leaves `latest` naming the previous, complete checkpoint; the next run
removes the stale `.tmp-*` directory. Every file we write is read back with torch.load(weights_only=True)
or safetensors, so loading a checkpoint never executes pickled code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from model.io import ArtifactError, latest_checkpoint
from train.errors import TrainError
from train.strategy import TRAIN_STATE, Strategy

_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG a training step may draw from, as plain python / tensors (weights_only-safe)."""
    np_state = np.random.get_state(legacy=True)  # ('MT19937', uint32[624], pos, has_gauss, cached)
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's GPU only: get_rng_state_all() would open a context on every visible GPU
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu(), torch.cuda.current_device())


def _tuples(x):
    """random.setstate wants the nested tuples it gave; a round trip may have made them lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- paths


def step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` -> run_dir's latest (or None), `never` -> None,
    anything else a checkpoint directory or a run directory (its latest)."""
    if resume == "never":
        return None
    if resume == "auto":
        try:
            return latest_checkpoint(run_dir)
        except ArtifactError as e:
            raise TrainError(
                f"{e}; resume from an explicit checkpoint with train.resume=PATH or start over with train.resume=never"
            ) from None
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        ck = latest_checkpoint(path)
        if ck is None:
            raise TrainError(f"train.resume={resume}: that run directory has no complete checkpoint")
        return ck
    if not path.is_dir():
        raise TrainError(
            f"train.resume={resume}: no such checkpoint directory "
            "(use auto, never, a run directory or RUN/checkpoints/step_N)"
        )
    if not any((path / n).exists() for n in (TRAIN_STATE, "dcp", "deepspeed")):
        raise TrainError(
            f"train.resume={resume}: {path} is not a training checkpoint (no {TRAIN_STATE}); "
            "to start from a model artifact's weights use train.init_from"
        )
    return path


def load_rank_rng(ckpt: Path, rank: int, extra: dict) -> dict | None:
    """This rank's RNG state: its own file when the run had several ranks, else the shared one."""
    own = ckpt / f"rng_rank{rank:05d}.pt"
    if own.is_file():
        return torch.load(own, map_location="cpu", weights_only=True)
    return extra.get("rng")


# ----------------------------------------------------------------------------- writing


class CheckpointManager:
    """Atomic saves, `latest`, `best`, and pruning to keep_last (+ best). Every rank calls save()."""

    def __init__(self, run_dir: str | os.PathLike, strategy: Strategy, keep_last: int = 3):
        self.root = Path(run_dir) / "checkpoints"
        self.strategy = strategy
        self.keep_last = keep_last

    def clean_stale(self) -> None:
        """Remove .tmp-* directories that a crash during a save left behind (main rank, at start-up)."""
        if self.strategy.is_main and self.root.is_dir():
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def remove_all(self) -> None:
        if self.strategy.is_main and self.root.exists():
            shutil.rmtree(self.root)

    def save(self, step: int, extra: dict, metadata: dict, is_best: bool = False) -> Path:
        s = self.strategy
        name = checkpoint_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if s.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        s.barrier()
        s.save(tmp, extra, metadata)
        if s.world_size > 1:  # each rank's dropout stream differs; keep them all for an exact resume
            torch.save(extra["rng"], tmp / f"rng_rank{s.rank:05d}.pt")
        s.barrier()
        if s.is_main:
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of a lost future (latest names an older one): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / "latest", name + "\n")
            if is_best:
                _symlink_atomic(self.root / "best", name)
            self.prune()
        s.barrier()
        return final

    def prune(self) -> None:
        """Keep the newest keep_last checkpoints, the one `latest` names and the one `best` points to."""
        if self.keep_last <= 0:
            return
        ckpts = sorted(
            (p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and step_of(p) is not None),
            key=step_of,
        )
        keep = {p.name for p in ckpts[-self.keep_last :]}
        latest = self.root / "latest"
        if latest.is_file():
            keep.add(latest.read_text().strip())
        best = self.root / "best"
        if best.is_symlink():
            keep.add(os.readlink(best))
        for p in ckpts:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _symlink_atomic(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _fsync_tree(root: Path) -> None:
    """Flush every file of a checkpoint before the rename makes it visible (a power loss after the
    rename must not expose empty files)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
