"""End to end through the real loop: `torchrun --nproc_per_node=2 -m train` with parallel.strategy=ddp,
then the same run resumed by one process (parallel.strategy=none): the losses are those of an
uninterrupted one-process run (same global batch; the loader continues the global stream)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_helpers import DEBUG_YAML, REPO, prepared_dataset, python_env, run_cli, tiny_overrides, train_losses

pytestmark = pytest.mark.slow

LOSS_TOL = 1e-5  # fp32, dropout 0: only the reduction order differs (2 ranks x 1 micro-batch vs 1 x 2)


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**python_env(), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "train",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_ddp_run_under_torchrun_resumes_in_one_process(tmp_path_factory, tmp_path):
    data = prepared_dataset(tmp_path_factory)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = run_cli(["--config", str(DEBUG_YAML), *tiny_overrides(data, ref_dir, "train.max_steps=4")])
    assert ref.returncode == 0, ref.stderr[-3000:]

    first = torchrun(
        2,
        [
            "--config",
            str(DEBUG_YAML),
            *tiny_overrides(data, run_dir, "train.max_steps=2", "checkpoint.every=2", "parallel.strategy=ddp"),
        ],
    )
    assert first.returncode == 0, f"{first.stdout[-2000:]}\n{first.stderr[-4000:]}"  # no abort at exit either
    assert (run_dir / "checkpoints" / "step_000002" / "model" / "model.safetensors").is_file()

    second = run_cli(
        ["--config", str(DEBUG_YAML), *tiny_overrides(data, run_dir, "train.max_steps=4", "parallel.strategy=none")]
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr

    want, got = train_losses(ref_dir), train_losses(run_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert abs(got[step] - want[step]) < LOSS_TOL, (step, got[step], want[step])


def test_a_user_error_under_torchrun_is_one_line_from_rank_0(tmp_path_factory, tmp_path):
    """Every rank raises the same DataError (the step does not split over 2 ranks): rank 0 alone prints it,
    the launch fails, and no rank prints a traceback (torchrun's own failure summary aside)."""
    data = prepared_dataset(tmp_path_factory)
    args = tiny_overrides(data, tmp_path / "r", "train.tokens_per_step=128", "parallel.strategy=ddp")
    proc = torchrun(2, ["--config", str(DEBUG_YAML), *args])
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "does not divide into micro_batch" in line]
    assert len(lines) == 1 and lines[0].startswith("error: tokens_per_step=128"), proc.stderr[-3000:]
    assert "rank 1" not in lines[0]
    assert "exitcode  : 2" in proc.stderr  # a rank exited with our code (torchrun may stop the other first)
    assert "/train/" not in proc.stderr and "/data/" not in proc.stderr  # no frame of ours: no rank traceback
    assert not (tmp_path / "r" / "checkpoints").exists()
