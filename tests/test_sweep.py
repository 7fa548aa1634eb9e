"""python -m train.sweep on CPU: trials as training runs, pruning, SIGKILL and resume, two workers,
torchrun trials, best.yaml, the loop's callback seam and the search-space errors.

Tiny models (train_helpers.TINY) and a few steps per trial; the sweeps that must be real processes
(kill, workers, torchrun) are the only subprocesses.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_extra
from train_helpers import DEBUG_YAML, REPO, metrics, python_env, tiny_overrides

optuna = require_extra("optuna", "sweep")
from optuna.trial import TrialState  # noqa: E402

from model.cli import run as run_command  # noqa: E402
from train.callbacks import TrainPruned  # noqa: E402
from train.config import load_config  # noqa: E402
from train.loop import run  # noqa: E402
from train.sweep.__main__ import main, trial_seed  # noqa: E402

LR_SPACE = "optim.lr: {log_float: [1.0e-4, 1.0e-2]}\nmodel.dropout: {float: [0.0, 0.2], step: 0.1}\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def space(tmp_path: Path, text: str, name: str = "space") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def sweep_args(data_dir, tmp_path, space_path, *extra, steps=4, eval_every=2) -> list[str]:
    base = tiny_overrides(data_dir, tmp_path / "unused", f"train.max_steps={steps}", f"train.eval_every={eval_every}")
    base += ["train.eval_batches=1", "logging.log_every=100"]
    return ["--config", str(DEBUG_YAML), "--space", str(space_path), "--dir", str(tmp_path / "sweeps"), *extra, *base]


def load(tmp_path: Path, study: str):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'sweeps' / study}.db")


def finished(study) -> list:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def sweep_process(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train.sweep", *args],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_trials_are_training_runs_and_best_yaml_trains(data_dir, tmp_path, capsys):
    sp = space(tmp_path, LR_SPACE)
    assert main(sweep_args(data_dir, tmp_path, sp, "--trials", "3", "--pruner", "none")) == 0
    study = load(tmp_path, "space")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    for t in study.trials:
        run_dir = tmp_path / "sweeps" / "space" / f"trial_{t.number:04d}"
        cfg = load_config(run_dir / "config.yaml")
        assert cfg.optim.lr == pytest.approx(t.params["optim.lr"])  # the trial's values, trained
        assert cfg.model.dropout == pytest.approx(t.params["model.dropout"])
        assert cfg.train.seed == trial_seed(1337, t.number)  # from the study seed and the trial number
        vals = [r["val_loss"] for r in metrics(run_dir) if "val_loss" in r and r["step"] > 0]
        assert t.value == pytest.approx(min(vals))  # the objective: the run's best val loss
        assert t.intermediate_values == {2: pytest.approx(vals[0]), 4: pytest.approx(vals[1])}
    assert (
        len(
            {load_config(tmp_path / "sweeps" / "space" / f"trial_{i:04d}" / "config.yaml").train.seed for i in range(3)}
        )
        == 3
    )
    out = capsys.readouterr().out
    assert "parameter importances" in out and "rank  trial  best_val_loss" in out
    study_dir = tmp_path / "sweeps" / "space"
    assert (study_dir / "sweep.png").stat().st_size > 10_000 and (study_dir / "summary.txt").is_file()

    # best.yaml is the best trial's config, trained from scratch in its own run dir
    best = load_config(study_dir / "best.yaml", ["train.max_steps=2"])
    assert best.optim.lr == pytest.approx(study.best_trial.params["optim.lr"])
    assert best.train.run_dir == str(study_dir / "best")
    assert run(best, log=lambda m: None)["stopped"] == "done"
    assert (study_dir / "best" / "metrics.jsonl").is_file()

    # the same command again: nothing to do, nothing re-run
    assert main(sweep_args(data_dir, tmp_path, sp, "--trials", "3", "--pruner", "none")) == 0
    assert len(load(tmp_path, "space").trials) == 3
    # another space under the same study name is refused, not mixed in
    other = space(tmp_path, "optim.lr: {float: [1.0e-3, 2.0e-3]}\n", "space2")
    assert run_command(main, sweep_args(data_dir, tmp_path, other, "--study", "space", "--trials", "4")) == 2
    assert "was made with another space" in capsys.readouterr().err


def test_a_clearly_worse_trial_is_pruned(data_dir, tmp_path):
    # lr 1e-6 learns nothing in 6 steps; 1e-2 learns fast: after one finished trial, the median
    # pruner stops every trial worse than it at the first evaluation.
    sp = space(tmp_path, "optim.lr: {categorical: [1.0e-2, 1.0e-6]}\n", "prune")
    args = sweep_args(data_dir, tmp_path, sp, "--trials", "5", "--pruner-startup", "1", steps=6)
    assert main(args) == 0
    study = load(tmp_path, "prune")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and len(finished(study)) == 5
    for t in pruned:
        steps = [r["step"] for r in metrics(tmp_path / "sweeps" / "prune" / f"trial_{t.number:04d}")]
        assert max(steps) < 6  # it really stopped early
        assert t.params["optim.lr"] == 1e-6


def test_callback_seam_sees_each_evaluation_and_can_stop_the_run(data_dir, tmp_path):
    class Stop:
        def __init__(self):
            self.calls = []

        def after_eval(self, step, val_loss):
            self.calls.append((step, val_loss))
            return step >= 4

    cb = Stop()
    cfg = load_config(DEBUG_YAML, tiny_overrides(data_dir, tmp_path / "run", "train.max_steps=8", "train.eval_every=2"))
    with pytest.raises(TrainPruned) as e:
        run(cfg, log=lambda m: None, callbacks=[cb])
    assert e.value.step == 4
    vals = {r["step"]: r["val_loss"] for r in metrics(tmp_path / "run") if "val_loss" in r}
    assert cb.calls == [(2, vals[2]), (4, vals[4])] and max(vals) == 4


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_finishes_exactly_n(data_dir, tmp_path):
    sp = space(tmp_path, LR_SPACE, "kill")
    args = sweep_args(
        data_dir, tmp_path, sp, "--trials", "3", "--pruner", "none", "--no-report", steps=30, eval_every=10
    )
    proc = sweep_process(args)
    victim = tmp_path / "sweeps" / "kill" / "trial_0001" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (victim.is_file() and victim.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load(tmp_path, "kill").trials[1].state == TrialState.RUNNING  # what a kill leaves

    again = sweep_process(args)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert "trial 1 was running when its worker was killed" in out
    study = load(tmp_path, "kill")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == 4
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 1 and study.trials[1].state == TrialState.FAIL
    assert len(finished(study)) == 3


@pytest.mark.slow
def test_two_workers_share_one_study(data_dir, tmp_path):
    sp = space(tmp_path, LR_SPACE, "workers")
    args = sweep_args(data_dir, tmp_path, sp, "--trials", "4", "--workers", "2", "--pruner", "none", "--no-report")
    proc = sweep_process([*args, "train.max_steps=40", "train.eval_every=20"])
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    study = load(tmp_path, "workers")
    assert len(finished(study)) == 4  # exactly N between them, none running
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    # both asked for trials (a trial of 40 steps outlasts the second worker's start-up)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    assert "study workers (" in out


@pytest.mark.slow
def test_nproc_trials_run_under_torchrun_and_report_through_the_storage(data_dir, tmp_path):
    sp = space(tmp_path, "optim.lr: {log_float: [1.0e-3, 1.0e-2]}\n", "ddp")
    args = sweep_args(data_dir, tmp_path, sp, "--trials", "1", "--nproc", "2", "--no-report", "parallel.strategy=ddp")
    proc = sweep_process(args)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    (trial,) = load(tmp_path, "ddp").trials
    assert trial.state == TrialState.COMPLETE and set(trial.intermediate_values) == {2, 4}
    log = (tmp_path / "sweeps" / "ddp" / "trial_0000" / "train.log").read_text()
    assert "x 2 | strategy ddp" in log  # two ranks trained it


@pytest.mark.parametrize(
    "text, message",
    [
        ("optim.lrr: {log_float: [1.0e-4, 1.0e-2]}", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("optim.lr: {log_float: [1.0e-2, 1.0e-4]}", "is empty: write [low, high] with low < high"),
        ("optim.lr: {log_float: [0, 1.0e-2]}", "log_float needs low > 0"),
        ("model.n_layer: {float: [1, 4]}", "expects an integer"),
        ("model.n_layer: {int: [1.5, 4]}", "int needs [low, high] with two integers"),
        ("optim.lr: {logfloat: [1.0e-4, 1.0e-2]}", "did you mean 'log_float'?"),
        ("optim.lr: 1.0e-3", "expected a mapping"),
        ("model.dropout: {categorical: []}", "non-empty list"),
        ("train.tokens_per_step: {categorical: [256, 300]}", "must be a multiple of seq_len * micro_batch"),
        ("train.run_dir: {categorical: [a, b]}", "set by the sweep"),
    ],
)
def test_a_bad_space_is_one_clear_error_before_any_trial(data_dir, tmp_path, capsys, text, message):
    sp = space(tmp_path, text + "\n")
    assert run_command(main, sweep_args(data_dir, tmp_path, sp, "--trials", "1")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweeps").exists()  # no study, no trial
