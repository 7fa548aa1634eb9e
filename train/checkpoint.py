"""Checkpoints in the run directory: this module alone owns their layout (docs/checkpoints.md).

    RUN/checkpoints/
        step_000500/          written as .tmp-step_000500/, then renamed: never half a checkpoint
            model/            a complete model artifact (model/io.py): what eval/ opens. Always written,
                              except where the strategy's state holds sharded weights (weights_in_state):
                              then at the best and final checkpoints (`python -m train.consolidate`
                              writes it for the others)
            state/            what the strategy needs to resume and nothing else reads: DCP shards of
                              model + optimizer (every mesh layout), or the other engine's directory
            train_state.pt    the TrainState below, weights_only-loadable
            rng_rank00000.pt  each rank's RNG states (one file per rank)
        latest                the name of the newest complete checkpoint (replaced atomically)
        best -> step_...      the best by val loss (a relative symlink, replaced atomically)

A strategy saves into and loads from the state/ directory it is handed and never names a file of this
layout. A crash at any point of a save leaves `latest` naming the previous, complete checkpoint; the
next run removes the stale `.tmp-*` directory. Every file we write is read back with
torch.load(weights_only=True) or safetensors (another engine's own files excepted), so loading a
checkpoint never executes pickled code.

The crash tests kill a save at chosen points through train/faults.py's test-only hook (_fault below).

Resuming under another layout (load): a checkpoint that the running strategy cannot read natively
(DCP shards reshard to any mesh; the other engine's state, or the mesh's state under it, does not) is
converted to the strategy-neutral form (train/portable.py) and loaded from that. What carries over exactly is in
docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.files import atomic_dir, publish_dir, recover, symlink_atomic, write_text_atomic
from model.io import MODEL_DIR, ArtifactError, latest_checkpoint, save_artifact
from train.errors import TrainError
from train.faults import crash_point as _fault
from train.portable import Portable, from_checkpoint
from train.strategy import Strategy

TRAIN_STATE = "train_state.pt"
STATE_DIR = "state"
CONVERT_PREFIX = ".convert-"  # RUN/checkpoints/.convert-step_N: a checkpoint in the neutral form, while resuming
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


# ----------------------------------------------------------------------------- the saved state


@dataclass
class TrainState:
    """Everything the loop needs to continue a run, exactly what train_state.pt holds (plain python
    and tensors: weights_only-loadable). The RNG states are per rank, in rng_rank*.pt beside it."""

    step: int = 0
    loader: dict = field(default_factory=dict)  # data.loader.BatchLoader.state_dict()
    tokens: int = 0  # tokens trained on so far (all ranks)
    best_val: float | None = None
    best_step: int | None = None
    val_loss: float | None = None  # the last evaluation's
    world_size: int = 1
    strategy: str = "none"  # parallel.strategy that wrote it
    model_config: dict = field(default_factory=dict)  # ModelConfig.to_dict()
    config: dict = field(default_factory=dict)  # the run's resolved config
    artifact_metadata: dict = field(default_factory=dict)  # model/'s metadata, for train.consolidate
    strategy_state: dict = field(default_factory=dict)  # what Strategy.save_state returned on rank 0
    guard: dict = field(default_factory=dict)  # train/guard.py's SpikeGuard.state_dict(): skips, rollbacks

    def to_dict(self) -> dict:
        # not dataclasses.asdict: it would deep-copy the optimizer state
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, where: Path) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(d, dict) and names - set(d) == {"guard"}:
            d = {**d, "guard": {}}  # written before the spike guard existed: nothing was skipped
        if not isinstance(d, dict) or set(d) != names:
            raise TrainError(
                f"{where} holds a training state of another layout (DCP or DeepSpeed files at the "
                "step level, model.json beside them), which this code does not read; it cannot be resumed. "
                f"Start a new run from its weights with train.init_from={where.parent / MODEL_DIR} (if it has "
                "one), or start over with train.resume=never"
            )
        return cls(**d)


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


# ----------------------------------------------------------------------------- finding one


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
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise TrainError(f"train.resume={resume}: that run directory has no complete checkpoint")
        return ckpt
    if not path.is_dir():
        raise TrainError(
            f"train.resume={resume}: no such checkpoint directory "
            "(use auto, never, a run directory or RUN/checkpoints/step_N)"
        )
    if not (path / TRAIN_STATE).is_file():
        raise TrainError(
            f"train.resume={resume}: {path} is not a training checkpoint (no {TRAIN_STATE}); "
            "to start from a model artifact's weights use train.init_from"
        )
    return path


# ----------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Saves (atomic), loads (checked), `latest`, `best`, and pruning to keep_last (+ best).
    Every rank calls save() and load(); rank 0 alone writes the shared files."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        strategy: Strategy,
        model_config: ModelConfig,
        keep_last: int = 3,
        asynchronous: bool = False,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.strategy = strategy
        self.model_config = model_config
        self.keep_last = keep_last
        self.asynchronous = asynchronous  # checkpoint.async: save() returns while a thread writes
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group = None

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        try:
            return latest_checkpoint(self.root.parent)
        except ArtifactError:
            return None

    def clean_stale(self) -> None:
        """Remove what a crash during a save left behind (main rank, at start-up)."""
        if not (self.strategy.is_main and self.root.is_dir()):
            return
        for p in [
            *self.root.glob(".tmp-*"),
            *self.root.glob(f"{CONVERT_PREFIX}*"),
            *self.root.glob(f".{CONVERT_PREFIX}*"),
        ]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for p in self.root.glob(".step_*.old-*"):  # model.files.publish_dir's fallback, if it was cut short
            recover(self.root / p.name[1:].split(".old-")[0])

    def remove_all(self) -> None:
        if self.strategy.is_main and self.root.exists():
            shutil.rmtree(self.root)

    def save(self, state: TrainState, *, is_best: bool = False, with_model: bool = True) -> Path:
        """Write checkpoint step_{state.step}; state.artifact_metadata goes into the model artifact
        (tokenizer spec, step, ...). with_model=False skips the artifact where the strategy's state
        holds the weights (train.consolidate writes it later).

        Asynchronous (checkpoint.async_save): the previous save is waited for first (at most one in flight);
        then what is saved is copied to CPU memory and a writer thread finishes the checkpoint while
        training goes on (DCP's async_save for the strategy's state, this thread for the artifact and
        train_state.pt). `latest` is replaced only after the checkpoint is complete, by that thread."""
        self.wait()
        strategy, step = self.strategy, state.step
        name = checkpoint_name(step)
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE_DIR).mkdir(parents=True)
        strategy.barrier()
        # each rank's dropout stream differs; keep them all for an exact resume. Written first: once the
        # strategy's state is written on every rank, every rank's RNG file is too.
        torch.save(rng_state(), tmp / rng_file(strategy.rank))
        if self.asynchronous:
            strategy_state, written = strategy.save_state_async(tmp / STATE_DIR, self._process_group())
        else:
            strategy_state, written = strategy.save_state(tmp / STATE_DIR), None
        weights = None
        if with_model or not strategy.weights_in_state:
            weights = strategy.model_state_dict()  # collective: gathered to rank 0
            if self.asynchronous:  # training changes the parameters in place while the thread writes
                weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        # stamped here: a resumed run's state still names the strategy / world that wrote its start
        saved = dataclasses.replace(
            state, strategy_state=strategy_state, strategy=strategy.name, world_size=strategy.world_size
        )
        saved = copy.deepcopy(saved.to_dict()) if self.asynchronous else saved.to_dict()
        if not self.asynchronous:
            self._finish(step, tmp, final, written, weights, saved, is_best)
            strategy.barrier()
            return final
        self._pending = threading.Thread(
            target=self._finish_in_thread,
            args=(step, tmp, final, written, weights, saved, is_best),
            name=f"gptrain-save-{name}",
            daemon=True,
        )
        self._pending.start()
        return final

    def _finish(self, step, tmp: Path, final: Path, written, weights, saved: dict, is_best: bool) -> None:
        """The rest of a save once the state is handed over: wait for the strategy's write, then (rank 0)
        the artifact, train_state.pt, the rename, `latest`, `best` and pruning."""
        if written is not None:
            written.result()  # rank 0's DCP write ends with the metadata, after every rank's shards
        if self.strategy.is_main and weights is not None:
            save_artifact(tmp / MODEL_DIR, weights, self.model_config, saved["artifact_metadata"])
        del weights
        _fault("state", step)
        if not self.asynchronous:
            self.strategy.barrier()  # every rank's shards and RNG file are in
        if not self.strategy.is_main:
            return
        torch.save(saved, tmp / TRAIN_STATE)
        _fault("publish", step)
        publish_dir(tmp, final)  # fsync, then one rename (replacing a checkpoint of a lost future)
        _fault("latest", step)
        write_text_atomic(self.root / "latest", final.name + "\n")
        if is_best:
            symlink_atomic(self.root / "best", final.name)
        _fault("prune", step)
        self.prune()

    def _finish_in_thread(self, *args) -> None:
        try:
            self._finish(*args)
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread by wait()
            self._error = e

    def wait(self, all_ranks: bool = False) -> None:
        """Block until the save in flight (checkpoint.async_save) is complete; raise what it raised.
        all_ranks (a collective): also until rank 0 has published it, for a rank about to list them."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if all_ranks and self.asynchronous:
            self.strategy.barrier()

    @contextlib.contextmanager
    def finally_wait(self):
        """Around the loop: whichever way it ends (done, SIGTERM, an error), the save in flight is
        completed before the process goes on to exit."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # the loop's own error is the one to report
                self.wait()
            raise
        self.wait()

    def _process_group(self):
        """The gloo group of the asynchronous writes' own collectives (None in one process); made once,
        at the first save, which every rank calls."""
        import torch.distributed as dist

        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def load(self, ckpt: Path) -> TrainState:
        """Restore model, optimizer and this rank's RNG from ckpt (every rank); returns the TrainState.
        The RNG is restored last: the caller must not draw from it before the first training step."""
        self.wait()
        ckpt = Path(ckpt)
        raw = torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True)
        state = TrainState.from_dict(raw, ckpt / TRAIN_STATE)
        self.check_same_model(ckpt, state)
        if self.strategy.resumes_natively(state.strategy, state.strategy_state):
            weights = ckpt / MODEL_DIR if (ckpt / MODEL_DIR).is_dir() else None
            # a state/ of DCP shards or an engine directory holds the weights; an optimizer-only state does not
            if weights is None and "optimizer" in state.strategy_state:
                raise TrainError(
                    f"{ckpt} has no {MODEL_DIR}/ (its weights): the checkpoint is incomplete; resume another"
                )
            self.strategy.load_state(ckpt / STATE_DIR, state.strategy_state, weights)
        else:
            self.strategy.load_portable(self.convert(ckpt, state))
        own = ckpt / rng_file(self.strategy.rank)
        if own.is_file():  # a rank the saving run did not have keeps its fresh seed
            set_rng_state(torch.load(own, map_location="cpu", weights_only=True))
        return state

    def convert(self, ckpt: Path, state: TrainState) -> Portable:
        """The strategy-neutral form of ckpt (another strategy, world size or ZeRO stage wrote it):
        rank 0 converts into RUN/checkpoints/.convert-step_N (built under a temporary name, published
        by one rename: model.files.atomic_dir), every rank reads it, rank 0 removes it. The saved
        checkpoint is only read. A kill during the conversion leaves a temporary directory that the
        next start removes (clean_stale) and converts again."""
        where = self.root / f"{CONVERT_PREFIX}{ckpt.name}"
        failed: Exception | None = None
        if self.strategy.is_main:
            try:
                if where.exists():  # a previous resume converted, then died: convert again
                    shutil.rmtree(where)
                with atomic_dir(where) as tmp:
                    from_checkpoint(ckpt, ckpt / STATE_DIR, state, tmp).save(tmp)
                    _fault("convert", state.step)
            except Exception as e:  # every rank must stop, not wait for rank 0 at a barrier
                failed = e
        if self.strategy.any_flag(failed is not None):
            if failed is not None:
                raise failed
            raise TrainError(f"rank 0 could not convert {ckpt} (its message says why)")
        portable = Portable.load(where)
        self.strategy.barrier()
        if self.strategy.is_main:
            shutil.rmtree(where, ignore_errors=True)
        return portable

    def check_same_model(self, ckpt: Path, state: TrainState) -> None:
        """A clear message, instead of a size-mismatch traceback, when the run dir holds another model."""
        saved, want = state.model_config, self.model_config.to_dict()
        try:  # a checkpoint from before a ModelConfig field existed lacks it: it had the default
            saved = ModelConfig.from_dict(saved).to_dict()
        except (TypeError, ValueError):
            pass  # unknown or invalid keys: reported key by key below
        diff = {k: (saved.get(k), want.get(k)) for k in want if k != "dropout" and saved.get(k) != want.get(k)}
        if diff:
            raise TrainError(
                f"cannot resume from {ckpt}: its model differs from the config "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                "use another train.run_dir, or train.resume=never to start over"
            )

    def prune(self) -> None:
        """Keep the newest keep_last checkpoints, the one `latest` names and the one `best` points to."""
        if self.keep_last <= 0:
            return
        ckpts = sorted(
            (p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and step_of(p) is not None),
            key=step_of,
        )
        keep = {p.name for p in ckpts[-self.keep_last :]}
        latest = self.latest()
        if latest is not None:
            keep.add(latest.name)
        best = self.root / "best"
        if best.is_symlink():
            keep.add(os.readlink(best))
        for p in ckpts:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)
