"""`python -m train.sweep --config configs/debug.yaml --space configs/sweeps/debug.yaml [--trials N] ...`

A hyperparameter sweep on Optuna (Akiba et al. 2019): every trial is an ordinary training run of the
base config with the trial's values as overrides, in DIR/STUDY/trial_NNNN (config.yaml, metrics.jsonl,
checkpoints, train.log), so the usual tools open it. The design, in short (docs/sweeps.md says more):

- Storage: an Optuna RDB storage, SQLite at DIR/STUDY.db unless --storage names another URL. Running
  the same command again continues the study: finished and pruned trials are kept and never re-run.
- Workers: each worker asks the study for a trial and tells it the result (Optuna's ask-and-tell)
  until the study holds N finished-or-running trials; --workers K adds K-1 worker processes, and
  sweep commands on other machines with the same storage URL join the same way.
- A killed trial is failed, not resumed: each running trial records its worker (host, pid, process
  start time). A new command fails the RUNNING trials whose worker on this host is gone; trials of
  other machines are failed by Optuna's heartbeat once they miss it for --grace seconds. Failed
  trials do not count toward --trials; a new trial (a new number) takes their place.
- Pruning: the loop reports each evaluation through train/callbacks.py; the pruner (median by default,
  hyperband, halving or none) stops trials that are clearly worse.
- --nproc P: the worker starts each trial under torchrun; rank 0 re-attaches to the trial through the
  storage to report evaluations (train/sweep/trial.py); the worker reads metrics.jsonl for the result.
- Seeds: trial k trains with a seed derived from (--seed, k); the sampler's from (--seed, trials so
  far, worker), so that one uninterrupted worker repeats a sweep exactly.
- Output: a table of the best trials, parameter importances (fANOVA, Hutter et al. 2014), DIR/STUDY/
  sweep.png (optimisation history, slice and parallel-coordinate plots), DIR/STUDY/best.yaml (the best
  trial's complete config: `python -m train --config DIR/STUDY/best.yaml` trains it from scratch).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from model.cli import run
from model.errors import UserError
from train.config import Config, load_config
from train.errors import ConfigError, TrainError
from train.sweep.space import Param, check_space, load_space
from train.sweep.study import PRUNERS, make_pruner, make_storage

OBJECTIVES = {  # name -> (metrics.jsonl key, reduction, direction)
    "best_val_loss": ("val_loss", "min", "minimize"),
    "final_val_loss": ("val_loss", "last", "minimize"),
    # The HellaSwag accuracy (acc_norm) once the loop logs it at its evaluations under this key.
    "hellaswag_acc_norm": ("hellaswag_acc_norm", "last", "maximize"),
}
EPILOG = """examples:
  python -m train.sweep --config configs/debug.yaml --space configs/sweeps/debug.yaml --trials 8
  python -m train.sweep --config configs/debug.yaml --space configs/sweeps/debug.yaml --trials 8 --workers 2
  python -m train.sweep --config configs/gpt2-124m.yaml --space my_space.yaml --nproc 8 parallel.strategy=ddp \\
      --storage postgresql://user:pass@host/db            # run the same command on every machine
"""


class SweepError(TrainError):
    """A problem with the sweep itself (storage, study, objective) that the user can fix."""


def trial_seed(study_seed: int, number: int) -> int:
    """Trial k's training seed: a function of (study seed, k) alone (NumPy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence([study_seed, number]).generate_state(1)[0] % 2**31)


# ----------------------------------------------------------------------------- who runs a trial


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def worker_is_gone(owner: str) -> bool:
    """True when `owner` (a worker_id) ran on this host and that process no longer exists. Another
    host's worker is never judged here: Optuna's heartbeat covers those."""
    host, pid, start = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    if start != "?":
        return _start_time(int(pid)) != start
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when its parent dies (Linux prctl PR_SET_PDEATHSIG), so that a
    killed sweep takes its workers and torchrun jobs with it (they checkpoint and stop on SIGTERM)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Heartbeat:
    """Records the trial's heartbeat in the storage every interval while it runs (what Optuna's own
    optimize() does), so that other machines can tell a dead trial from a long one."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id, self.stop = storage, trial_id, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval() or 30
        while True:
            with contextlib.suppress(Exception):  # a busy database: the next beat will do
                self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(interval):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


# ----------------------------------------------------------------------------- the sweep


class Sweep:
    def __init__(self, args: argparse.Namespace, params: list[Param], base: Config):
        self.args, self.params, self.base = args, params, base
        self.dir = Path(args.dir) / args.study
        self.storage_url = args.storage or f"sqlite:///{Path(args.dir) / args.study}.db"
        self.key, self.reduce, self.direction = OBJECTIVES[args.objective]
        pruner = args.pruner if self.direction == "minimize" else "none"  # evaluations report val loss
        self.options = {
            "pruner": pruner,
            "startup": args.pruner_startup,
            "warmup": args.pruner_warmup,
            "eval_every": max(base.train.eval_every, 1),
            "max_steps": base.train.max_steps,
        }
        self.storage = None

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def study(self, worker: int = 0):
        """Create the study, or load it and check that it was made by the same sweep."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print
        if self.storage is None:
            if self.storage_url.startswith("sqlite:///"):
                Path(self.storage_url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            try:
                self.storage = make_storage(self.storage_url)
            except Exception as e:  # SQLAlchemy's errors: a bad URL, a server not reachable, a missing driver
                raise SweepError(f"--storage {self.storage_url}: {type(e).__name__}: {e}") from None
        study = optuna.create_study(
            study_name=self.args.study,
            storage=self.storage,
            direction=self.direction,
            load_if_exists=True,
            pruner=make_pruner(self.options),
        )
        made_by = {
            "config": json.dumps(self.base.to_dict(), sort_keys=True),
            "space": json.dumps([repr(p) for p in self.params]),
            "objective": self.args.objective,
        }
        if not study.user_attrs:
            for k, v in made_by.items():
                study.set_user_attr(k, v)
        else:
            differ = [k for k, v in made_by.items() if study.user_attrs.get(k) != v]
            if differ:
                raise SweepError(
                    f"study {self.args.study!r} in {self.storage_url} was made with another "
                    f"{' and '.join(differ)}; run the command that made it, or give a new --study name"
                )
        # The sampler's seed moves on with the study, so that a continued sweep does not replay the
        # random start of the first command; Optuna's TPE (Bergstra et al. 2011) by default.
        seed = trial_seed(self.args.seed, 10_000 + 100 * len(study.trials) + worker)
        study.sampler = optuna.samplers.TPESampler(seed=seed)
        return study

    def recover(self, study) -> None:
        """Fail the trials left RUNNING by a killed worker of this host (and, by heartbeat, of others)."""
        import optuna
        from optuna.trial import TrialState

        optuna.storages.fail_stale_trials(study)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker")
            if owner and worker_is_gone(owner):
                study._storage.set_trial_user_attr(t._trial_id, "failed_because", "its worker was killed")
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    study.tell(t.number, state=TrialState.FAIL)
                self.say(f"trial {t.number} was running when its worker was killed: marked failed (not counted)")

    def counted(self, study, before: int | None = None) -> int:
        """Trials that count toward --trials: finished (complete, pruned) or running."""
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        trials = study.get_trials(deepcopy=False, states=states)
        return sum(1 for t in trials if before is None or t.number < before)

    def work(self, worker: int = 0) -> None:
        """Ask, train, tell, until the study holds --trials counted trials."""
        import optuna
        from optuna.trial import TrialState

        study = self.study(worker)
        while self.counted(study) < self.args.trials:
            optuna.storages.fail_stale_trials(study)
            trial = study.ask()
            trial.set_user_attr("worker", worker_id())  # first: a kill from here on leaves a trial we can fail
            if self.counted(study, before=trial.number) >= self.args.trials:
                # another worker asked at the same moment and took the last place
                trial.set_user_attr("failed_because", "not needed: --trials reached by other workers")
                study.tell(trial, state=TrialState.FAIL)
                return
            if not self.run_trial(study, trial):
                return

    def trial_config(self, trial) -> tuple[Config, Path, dict]:
        run_dir = self.dir / f"trial_{trial.number:04d}"
        values = {p.key: p.suggest(trial) for p in self.params}
        seed = trial_seed(self.args.seed, trial.number)
        overrides = [
            *self.args.overrides,
            f"train.seed={seed}",  # before the space's values: a space may search the seed itself
            *(f"{k}={json.dumps(v)}" for k, v in values.items()),
            f"train.run_dir={run_dir}",
            "train.resume=never",  # trial numbers are never reused: an old directory is a leftover
            "logging.progress_bar=false",
        ]
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("seed", seed)
        return load_config(self.args.config, overrides), run_dir, values

    def run_trial(self, study, trial) -> bool:
        """Train one trial and tell the study. False when the worker should stop (a signal)."""
        from optuna.trial import TrialState

        t0 = time.perf_counter()
        try:
            cfg, run_dir, values = self.trial_config(trial)
        except ConfigError as e:  # a combination of values that each passed alone
            trial.set_user_attr("failed_because", str(e))
            study.tell(trial, state=TrialState.FAIL)
            self.say(f"trial {trial.number} | {e} | failed")
            return True
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            outcome = self.launch(study, trial, cfg, run_dir)
        except BaseException as e:  # a bug (traceback follows) or Ctrl-C: the trial did not finish
            reason = f"{type(e).__name__}: {e}".strip(": ")
            trial.set_user_attr("failed_because", reason)
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(e, UserError):
                self.say(f"trial {trial.number} | {shown} | failed: {e} (log: {run_dir / 'train.log'})")
                return True
            raise
        if outcome.startswith("stopped"):
            trial.set_user_attr("failed_because", outcome)
            study.tell(trial, state=TrialState.FAIL)
            self.say(f"trial {trial.number} | {shown} | {outcome}: marked failed; stopping this worker")
            return False
        records = _metrics(run_dir)
        steps = max((r["step"] for r in records), default=0)
        trial.set_user_attr("steps", steps)
        seconds = time.perf_counter() - t0
        if outcome == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            self.say(f"trial {trial.number} | {shown} | pruned at step {steps} | {seconds:.0f} s")
            return True
        value = self.objective(records)
        if value is None:
            study.tell(trial, state=TrialState.FAIL)
            raise SweepError(
                f"objective {self.args.objective}: {run_dir}/metrics.jsonl has no {self.key!r} record "
                + (
                    "(train.eval_every=0 never evaluates: set it > 0)"
                    if self.key == "val_loss"
                    else "(the loop does not log it: enable the HellaSwag evaluation, or use --objective best_val_loss)"
                )
            )
        study.tell(trial, value)
        result = f"{self.args.objective} {value:.4f} | {steps} steps | {seconds:.0f} s"
        self.say(f"trial {trial.number} | {shown} | {result}")
        return True

    def objective(self, records: list[dict]) -> float | None:
        values = [r[self.key] for r in records if self.key in r and r.get("step", 0) > 0]
        if not values:
            return None
        return min(values) if self.reduce == "min" else values[-1]

    def launch(self, study, trial, cfg: Config, run_dir: Path) -> str:
        """Run the trial: in this process, or under torchrun with --nproc > 1."""
        from train.sweep.trial import OUTCOME, train_trial

        log_path = run_dir / "train.log"
        if self.args.nproc == 1:
            with open(log_path, "a") as f, Heartbeat(self.storage, trial._trial_id):

                def log(msg: str) -> None:
                    f.write(msg + "\n")
                    f.flush()

                return train_trial(cfg, trial, self.options["pruner"] != "none", log)
        (run_dir / OUTCOME).unlink(missing_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.args.nproc}"]
        cmd += ["-m", "train.sweep.trial", str(run_dir), "--storage", self.storage_url, "--study", self.args.study]
        cmd += ["--trial-id", str(trial._trial_id), "--options", json.dumps(self.options)]
        with open(log_path, "a") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
            with Heartbeat(self.storage, trial._trial_id):
                rc = proc.wait()
        if rc != 0 or not (run_dir / OUTCOME).is_file():
            tail = "\n".join(log_path.read_text().splitlines()[-5:])
            raise TrainError(f"torchrun exited {rc}; the end of its log:\n{tail}")
        return json.loads((run_dir / OUTCOME).read_text())["outcome"]

    def run_workers(self, argv: list[str]) -> None:
        """K workers on the same study (Optuna's shared storage): this process and K-1 copies of it."""
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "train.sweep", *argv, "--worker-index", str(i)], preexec_fn=_die_with_parent
            )
            for i in range(1, self.args.workers)
        ]
        try:
            self.work(0)
        finally:
            codes = [p.wait() for p in procs]
        if any(codes):
            raise SweepError(f"worker exit codes {codes}: see their messages above")

    # ------------------------------------------------------------------ the report
    def report(self, study) -> None:
        from train.sweep.report import write_report

        write_report(self, study)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


# ----------------------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m train.sweep",
        description="A hyperparameter sweep on Optuna: each trial is a training run of --config.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="the base run file, e.g. configs/debug.yaml")
    ap.add_argument("--space", required=True, help="the search space, e.g. configs/sweeps/debug.yaml")
    ap.add_argument("--trials", type=int, default=20, help="finished trials to reach (pruned ones count)")
    ap.add_argument("--study", help="study name (default: the space file's name); runs in DIR/STUDY/")
    ap.add_argument("--dir", default="runs/sweeps", help="where studies live (default runs/sweeps)")
    ap.add_argument("--storage", help="an Optuna storage URL (default sqlite:///DIR/STUDY.db)")
    ap.add_argument("--workers", type=int, default=1, help="trial processes at once on this machine")
    ap.add_argument("--nproc", type=int, default=1, help="processes per trial (torchrun)")
    ap.add_argument("--objective", default="best_val_loss", choices=list(OBJECTIVES))
    ap.add_argument("--pruner", default="median", choices=PRUNERS)
    ap.add_argument("--pruner-startup", type=int, default=5, help="median: trials that finish before any pruning")
    ap.add_argument("--pruner-warmup", type=int, default=0, help="median: steps of a trial before it can be pruned")
    ap.add_argument("--seed", type=int, help="study seed (default: the config's train.seed)")
    ap.add_argument("--top", type=int, default=10, help="rows of the best-trials table")
    ap.add_argument("--no-report", action="store_true", help="skip the table, plots and best.yaml (other machines)")
    ap.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set on the processes of --workers
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="override base config values")
    args = ap.parse_intermixed_args(argv)  # overrides and options in any order; the last of each wins
    for name in ("trials", "workers", "nproc"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.study is None:
        args.study = Path(args.space).stem
    return args


def _quiet() -> None:
    """Optuna's notes on what we do on purpose: heartbeats with ask-and-tell, its experimental helper."""
    warnings.filterwarnings("ignore", message=".*fail_stale_trials is experimental")
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", message=".*not compatible with tight_layout")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _quiet()
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SweepError("sweeps need Optuna: pip install -e '.[sweep]' (or pip install optuna)") from None
    params = load_space(args.space)
    base = check_space(params, args.config, args.overrides, args.space)
    if args.seed is None:
        args.seed = base.train.seed
    if args.nproc > 1 and base.parallel.strategy == "none":
        n = args.nproc
        raise ConfigError(f"--nproc {n} runs each trial on {n} processes: add parallel.strategy=ddp")
    sweep = Sweep(args, params, base)
    if args.worker_index is not None:
        sweep.work(args.worker_index)
        return 0
    study = sweep.study()
    sweep.recover(study)
    done = sweep.counted(study)
    sweep.say(
        f"study {args.study} ({sweep.storage_url}): {done} of {args.trials} trials counted so far | "
        f"objective {args.objective} ({sweep.direction}) | pruner {sweep.options['pruner']} | trials in {sweep.dir}"
    )
    sweep.run_workers(argv)
    if not args.no_report:
        sweep.report(sweep.study())
    return 0


if __name__ == "__main__":
    sys.exit(run(main, interrupted="interrupted: run the same command to continue the study"))
