"""The spike guard (train/guard.py) through the real loop, one process, a gradient corrupted on purpose
(GPTRAIN_SPIKE, the test-only hook):

    skip       a NaN gradient at step 5: the update is skipped (logged, in metrics.jsonl), the weights and
               the optimizer state of step 4 and step 5 are the same, the run finishes
    outlier    a x1e4 gradient: skipped as an outlier (its z-score), not as a non-finite step
    off        the same NaN with the guard off: today's clear stop
    rollback   two NaN steps roll back to the checkpoint before them and skip their data; a run killed
               (SIGKILL) after the rollback resumes with the uninterrupted run's losses, exactly
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import metrics, prepared_dataset, run_cli, tiny_config, tiny_overrides, train_losses

from train.errors import TrainError
from train.guard import SPIKE_ENV
from train.loop import run

GUARD = ["guard.enabled=true", "guard.warmup=3", "checkpoint.every=1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_dataset(tmp_path_factory)


def ckpt(run_dir, step: int):
    return run_dir / "checkpoints" / f"step_{step:06d}"


def test_nan_gradient_skipped_without_moving_the_state(data, tmp_path, monkeypatch):
    monkeypatch.setenv(SPIKE_ENV, "nan@5")
    lines = []
    out = run(tiny_config(data, tmp_path, *GUARD, "train.max_steps=7"), log=lines.append)
    assert out["step"] == 7 and out["stopped"] == "done"
    skips = [r for r in metrics(tmp_path) if "skipped" in r]
    assert [(r["step"], r["skipped"]) for r in skips] == [(5, "non-finite")]
    assert any("step 5: update skipped (non-finite)" in m for m in lines)
    w4, w5, w6 = (load_file(ckpt(tmp_path, s) / "model" / "model.safetensors") for s in (4, 5, 6))
    assert all(torch.equal(w4[k], w5[k]) for k in w4)  # the skipped step moved no weight
    assert not all(torch.equal(w5[k], w6[k]) for k in w5)  # the next one did
    m4, m5 = (optimizer_state(ckpt(tmp_path, s), tmp_path / f"o{s}.pt") for s in (4, 5))
    assert m4.keys() == m5.keys()
    assert all(torch.equal(m4[k][n], m5[k][n]) for k in m4 for n in ("step", "exp_avg", "exp_avg_sq"))
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4, 6, 7]  # the skipped step has no loss line


def optimizer_state(ckpt_dir, scratch) -> dict:
    """AdamW's state per parameter name, read from a checkpoint's DCP shards."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt_dir / "state", scratch)
    return torch.load(scratch, weights_only=True)["optim"]["state"]


def test_huge_gradient_skipped_as_outlier(data, tmp_path, monkeypatch):
    monkeypatch.setenv(SPIKE_ENV, "scale@6")
    run(tiny_config(data, tmp_path, *GUARD, "checkpoint.every=0", "train.max_steps=7"), log=lambda m: None)
    skips = [r for r in metrics(tmp_path) if "skipped" in r]
    assert [(r["step"], r["skipped"]) for r in skips] == [(6, "outlier")]
    assert skips[0]["z_norm"] > 6


def test_guard_off_stops_on_nan(data, tmp_path, monkeypatch):
    monkeypatch.setenv(SPIKE_ENV, "nan@3")
    with pytest.raises(TrainError, match="non-finite loss or gradient at step 3"):
        run(tiny_config(data, tmp_path, "train.max_steps=5"), log=lambda m: None)


ROLLBACK = [
    "guard.enabled=true",
    "guard.warmup=3",
    "guard.rollback_skips=2",
    "guard.rollback_within=5",
    "checkpoint.every=3",
    "train.max_steps=14",
    "schedule.total_steps=14",
]


def test_rollback_skips_the_data_and_resumes_exactly(data, tmp_path, monkeypatch):
    monkeypatch.setenv(SPIKE_ENV, "nan@7,8")
    ref = tmp_path / "ref"
    lines = []
    run(tiny_config(data, ref, *ROLLBACK), log=lines.append)
    rollbacks = [r["rollback"] for r in metrics(ref) if "rollback" in r]
    assert len(rollbacks) == 1 and rollbacks[0]["at_step"] == 8 and rollbacks[0]["to_step"] == 6
    w0, w1 = rollbacks[0]["windows"]
    assert w1 - w0 == 2 * 8  # steps 7 and 8's data: 8 windows of 32 tokens per step
    assert any("rolled back to step_000006" in m and f"[{w0}, {w1})" in m for m in lines)
    want = train_losses(ref)
    assert set(range(7, 15)) <= set(want)  # steps 7-14 trained after the rollback, on later data

    # the same run, killed while saving step 12 (after the rollback), then resumed by the same command
    got = tmp_path / "got"
    args = ["--config", "configs/debug.yaml", *tiny_overrides(data, got, *ROLLBACK)]
    monkeypatch.setenv("GPTRAIN_FAULT", "publish@12")
    killed = run_cli(args)
    assert killed.returncode != 0 and (got / "checkpoints" / "latest").read_text().strip() == "step_000009"
    monkeypatch.delenv("GPTRAIN_FAULT")
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rolled back" not in resumed.stdout + resumed.stderr  # the corrupted data stays skipped
    have = train_losses(got)
    assert [have[s] for s in range(10, 15)] == [want[s] for s in range(10, 15)]


@pytest.mark.slow
def test_ddp_skip_decided_together(data, tmp_path, monkeypatch):
    """2 DDP ranks (gloo); rank 1 alone gets a NaN gradient at step 3: both ranks skip it (the decision
    is reduced), so rank 0's weights of step 2 and step 3 are the same."""
    import subprocess
    import sys

    from train_helpers import DEBUG_YAML, REPO, python_env

    monkeypatch.setenv(SPIKE_ENV, "nan@3:1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    cmd += ["--config", str(DEBUG_YAML), *tiny_overrides(data, tmp_path, *GUARD, "parallel.strategy=ddp")]
    proc = subprocess.run(
        cmd + ["train.max_steps=4"], cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["step"], r["skipped"]) for r in metrics(tmp_path) if "skipped" in r] == [(3, "non-finite")]
    w2, w3 = (load_file(ckpt(tmp_path, s) / "model" / "model.safetensors") for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


def test_rollback_cap_stops_the_run(data, tmp_path, monkeypatch):
    """guard.max_rollbacks=1: the NaN pair at data steps 7-8 rolls back once; the pair at data steps 11-12
    (training steps 9-10, after the 2 skipped data steps) calls for a second rollback, which stops the run
    with one line naming the last good checkpoint (a TrainError: exit code 2) and a metrics record."""
    monkeypatch.setenv(SPIKE_ENV, "nan@7,8,11,12")
    lines = []
    with pytest.raises(TrainError, match=r"step 10 calls for rollback 2, over guard.max_rollbacks=1") as err:
        run(tiny_config(data, tmp_path, *ROLLBACK, "guard.max_rollbacks=1"), log=lines.append)
    assert "step_000006" in str(err.value) and "\n" not in str(err.value)
    records = metrics(tmp_path)
    assert [r["rollback"]["at_step"] for r in records if "rollback" in r] == [8]
    assert [(r["step"], r["stopped"]) for r in records if "stopped" in r] == [(10, "guard.max_rollbacks")]
