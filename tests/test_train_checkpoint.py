"""Checkpoints: bit-exact resume after SIGKILL, atomic saves, SIGTERM, retention, resume modes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import (
    DEBUG_YAML,
    REPO,
    metrics,
    python_env,
    run_cli,
    tiny_config,
    tiny_overrides,
    train_losses,
    val_losses,
)

from model.io import load_model
from train.errors import TrainError
from train.loop import run
from train.parallel.mesh_strategy import MeshStrategy

QUIET = dict(log=lambda m: None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resume_after_sigkill_is_bit_exact(data_dir, tmp_path):
    """2N steps straight == N steps, SIGKILL right after the step-N checkpoint, resume, N more steps:
    identical train losses at every step and identical val losses, with dropout on, evaluation and
    sampling interleaved (neither may move the training RNG) and the LR schedule mid-warmup/decay."""
    n = 4
    common = [
        f"train.max_steps={2 * n}",
        "model.dropout=0.1",
        "train.eval_every=3",
        "logging.sample_every=3",
        "logging.sample_tokens=8",
        f"checkpoint.every={n}",
        "schedule.warmup_steps=3",
    ]
    ref = tmp_path / "ref"
    run(tiny_config(data_dir, ref, *common), **QUIET)

    killed = tmp_path / "killed"
    # SIGKILL right after the step-n checkpoint is complete (train/checkpoint.py's fault hook)
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(DEBUG_YAML), *tiny_overrides(data_dir, killed, *common)],
        cwd=REPO,
        env={**python_env(), "GPTRAIN_FAULT": f"prune@{n}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (killed / "checkpoints" / "latest").read_text().strip() == f"step_{n:06d}"
    assert max(train_losses(killed)) == n

    proc = run_cli(["--config", str(DEBUG_YAML), *tiny_overrides(data_dir, killed, *common)])  # resume: auto
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {killed / 'checkpoints' / f'step_{n:06d}'} at step {n}" in proc.stdout

    ref_loss, got_loss = train_losses(ref), train_losses(killed)
    assert sorted(ref_loss) == list(range(1, 2 * n + 1))
    assert got_loss == ref_loss  # exact float equality, every step
    assert val_losses(killed) == val_losses(ref)
    ref_samples = [r["sample"] for r in metrics(ref) if "sample" in r]
    assert [r["sample"] for r in metrics(killed) if "sample" in r] == ref_samples


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(data_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save_state = MeshStrategy.save_state

    def crashing_save_state(self, state_dir):
        if state_dir.parent.name == ".tmp-step_000004":
            raise OSError(28, "No space left on device")  # the disk fills up while step 4 is written
        return real_save_state(self, state_dir)

    monkeypatch.setattr(MeshStrategy, "save_state", crashing_save_state)
    cfg = tiny_config(data_dir, run_dir, "train.max_steps=6", "checkpoint.every=2")
    with pytest.raises(OSError, match="No space"):
        run(cfg, **QUIET)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    assert (ckpts / ".tmp-step_000004").is_dir() and not (ckpts / "step_000004").exists()
    model, meta = load_model(run_dir)  # the run dir still resolves to a complete model
    assert meta["step"] == 2
    state = torch.load(ckpts / "step_000002" / "train_state.pt", weights_only=True)  # no pickled code
    assert state["step"] == 2 and state["loader"]["windows_consumed"] > 0
    assert sorted(p.name for p in (ckpts / "step_000002").iterdir()) == [
        "model",
        "rng_rank00000.pt",
        "state",
        "train_state.pt",
    ]

    monkeypatch.setattr(MeshStrategy, "save_state", real_save_state)
    out = run(cfg, **QUIET)  # resume: auto, from step 2
    assert out["step"] == 6
    assert not list(ckpts.glob(".tmp-*"))
    assert (ckpts / "latest").read_text().strip() == "step_000006"


@pytest.mark.parametrize("point", ["state", "publish", "latest", "prune"])
def test_sigkill_inside_a_save_resumes_from_a_complete_checkpoint(data_dir, tmp_path, point):
    """The fault hook kills the process at each point of the step-2 save: `latest` names a complete
    checkpoint (step 2 once it is renamed, else step 1), and the resumed run finishes."""
    run_dir = tmp_path / point
    args = ["--config", str(DEBUG_YAML), *tiny_overrides(data_dir, run_dir, "train.max_steps=3", "checkpoint.every=1")]
    proc = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env={**python_env(), "GPTRAIN_FAULT": f"{point}@2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpts = run_dir / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == ("step_000002" if point == "prune" else "step_000001")
    assert (ckpts / latest / "train_state.pt").is_file()
    assert (ckpts / "step_000002").is_dir() == (point in ("latest", "prune"))
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {ckpts / latest}" in proc.stdout
    assert (ckpts / "latest").read_text().strip() == "step_000003"
    assert not list(ckpts.glob(".tmp-*"))


def test_old_layout_checkpoint_is_refused_with_one_message(data_dir, tmp_path):
    run_dir = tmp_path / "old"
    run(tiny_config(data_dir, run_dir, "train.max_steps=1", "checkpoint.every=1"), **QUIET)
    ckpt = run_dir / "checkpoints" / "step_000001"
    torch.save({"extra": {"step": 1}, "strategy": "fsdp", "world_size": 2}, ckpt / "train_state.pt")
    with pytest.raises(TrainError, match="another layout .*cannot be resumed.*train.init_from="):
        run(tiny_config(data_dir, run_dir, "train.max_steps=2"), **QUIET)


def test_sigterm_saves_a_checkpoint_and_exits_zero(data_dir, tmp_path):
    run_dir = tmp_path / "pre"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "train",
            "--config",
            str(DEBUG_YAML),
            *tiny_overrides(data_dir, run_dir, "train.max_steps=100000"),
        ],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while len(train_losses(run_dir)) < 3:  # a few steps in
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "stopped by SIGTERM" in out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert step >= 3 and step == max(train_losses(run_dir))
    state = torch.load(run_dir / "checkpoints" / latest / "train_state.pt", weights_only=True)
    assert state["step"] == step


def test_keeps_the_last_k_and_the_best(data_dir, tmp_path):
    run_dir = tmp_path / "keep"
    run(
        tiny_config(
            data_dir,
            run_dir,
            "train.max_steps=8",
            "checkpoint.every=1",
            "checkpoint.keep_last=2",
            "checkpoint.keep_best=true",
            "train.eval_every=1",
            # the warmup ramps the lr past what a tiny model survives: the loss is lowest after step 1
            "optim.lr=0.5",
            "schedule.warmup_steps=8",
        ),
        **QUIET,
    )
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir() if p.is_dir() and not p.is_symlink())
    vals = {s: v for s, v in val_losses(run_dir).items() if s > 0}
    best_step = min(vals, key=vals.get)
    # The premise: the best checkpoint is older than the last 2, so only keep_best keeps it.
    assert best_step < 7, vals
    assert os.readlink(ckpts / "best") == f"step_{best_step:06d}"
    assert set(names) == {"step_000007", "step_000008", f"step_{best_step:06d}"}
    _, meta = load_model(ckpts / "best")
    assert meta["val_loss"] == vals[best_step]


def test_resume_never_starts_over_and_finished_runs_do_nothing(data_dir, tmp_path):
    run_dir = tmp_path / "again"
    cfg = tiny_config(data_dir, run_dir, "train.max_steps=3", "checkpoint.every=1")
    run(cfg, **QUIET)
    assert run(cfg, **QUIET)["step"] == 3  # resume: auto at max_steps: nothing to train
    assert max(train_losses(run_dir)) == 3
    run(tiny_config(data_dir, run_dir, "train.max_steps=1", "train.resume=never"), **QUIET)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step")) == ["step_000001"]
    assert sorted(train_losses(run_dir)) == [1]


def test_resume_from_another_model_is_a_clear_error(data_dir, tmp_path):
    run_dir = tmp_path / "mismatch"
    run(tiny_config(data_dir, run_dir, "train.max_steps=1"), **QUIET)
    with pytest.raises(TrainError, match="n_layer: 2 -> 3"):
        run(tiny_config(data_dir, run_dir, "model.n_layer=3", "train.max_steps=2"), **QUIET)


def test_resume_from_a_checkpoint_path_continues_that_checkpoint(data_dir, tmp_path):
    """train.resume=PATH in a new run dir: the run continues the named checkpoint (step 2, though the
    source run also has step 4), with the losses the source run had after it, exactly."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    run(tiny_config(data_dir, src, "train.max_steps=4", "checkpoint.every=2"), **QUIET)
    step2 = src / "checkpoints" / "step_000002"
    assert step2.is_dir() and (src / "checkpoints" / "step_000004").is_dir()
    out = run(tiny_config(data_dir, dst, "train.max_steps=4", f"train.resume={step2}"), **QUIET)
    assert out["step"] == 4
    want, got = train_losses(src), train_losses(dst)
    assert sorted(got) == [3, 4] and got == {s: want[s] for s in (3, 4)}


def test_an_init_from_run_that_is_interrupted_resumes_from_its_own_checkpoints(data_dir, tmp_path):
    """A fine-tune (train.init_from) stopped at step 2 and run again resumes from its own step-2
    checkpoint, not from init_from's weights again: its losses are the uninterrupted fine-tune's."""
    base = tmp_path / "base"
    run(tiny_config(data_dir, base, "train.max_steps=3", "checkpoint.every=3"), **QUIET)
    ft = ["checkpoint.every=2", f"train.init_from={base}", "optim.lr=1e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_config(data_dir, straight, *ft, "train.max_steps=4"), **QUIET)
    run(tiny_config(data_dir, split, *ft, "train.max_steps=2"), **QUIET)
    logs: list[str] = []
    run(tiny_config(data_dir, split, *ft, "train.max_steps=4"), log=logs.append)
    assert any("resumed from" in m and "step_000002" in m for m in logs), logs
    want, got = train_losses(straight), train_losses(split)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert got == want
    assert want[1] < train_losses(base)[1] - 0.1  # the fine-tune did start from the trained weights
