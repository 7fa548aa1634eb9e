"""Restarts: launch.sh --max-restarts (torchrun's elastic restarts) and the sbatch script's SLURM requeue.

sbatch       configs/slurm-2node.sbatch under stand-in srun / scontrol: USR1 (SLURM's warning before the
             time limit) sends SIGTERM to the job step (training checkpoints and exits), waits for it, and
             requeues the job, until SLURM_RESTART_COUNT reaches MAX_REQUEUES; the step runs launch.sh
             with --max-restarts
launch       --max-restarts reaches torchrun, also for one process of parallel.strategy=none; multi-node
             restarts use the c10d rendezvous
lost rank    2 DDP ranks through launch.sh --max-restarts 2; rank 1 is SIGKILLed in step 5 of the first
             attempt (GPTRAIN_KILL, the test-only hook): torchrun restarts both, the run resumes from
             step_000004 and finishes by itself with the uninterrupted run's losses, and says so
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import run_launch
from train_helpers import DEBUG_YAML, REPO, metrics, prepared_dataset, python_env, tiny_overrides, train_losses

SBATCH = REPO / "configs" / "slurm-2node.sbatch"


def stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def fake_slurm(tmp_path: Path) -> dict:
    """srun: records its arguments, runs until SIGTERM (a minute at most), records that; scontrol: records
    its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(
        bin_dir / "srun",
        f"printf '%s\\n' \"$@\" > {tmp_path}/srun_args\n"
        f"trap 'echo term > {tmp_path}/srun_term; exit 0' TERM\n"
        f"touch {tmp_path}/srun_started\n"
        "for _ in $(seq 1200); do sleep 0.05; done\n",  # a minute at most, should nothing stop it
    )
    stub(bin_dir / "scontrol", f'echo "$@" >> {tmp_path}/scontrol_calls\n')
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "77"}


@pytest.mark.parametrize("requeued,want_requeue", [("0", True), ("10", False)])
def test_sbatch_checkpoints_and_requeues_on_usr1(tmp_path, requeued, want_requeue):
    text = SBATCH.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    env = {**fake_slurm(tmp_path), "SLURM_RESTART_COUNT": requeued}
    proc = subprocess.Popen(
        ["bash", str(SBATCH), "configs/debug.yaml", "train.max_steps=5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (tmp_path / "srun_started").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "srun_term").read_text().strip() == "term"  # the step was asked to checkpoint
    args = (tmp_path / "srun_args").read_text().split("\n")
    assert args[args.index("launch.sh") :][:5] == [
        "launch.sh",
        "--max-restarts",
        "3",
        "configs/debug.yaml",
        "train.max_steps=5",
    ]
    calls = (tmp_path / "scontrol_calls").read_text() if (tmp_path / "scontrol_calls").exists() else ""
    assert calls == ("requeue 77\n" if want_requeue else ""), err
    if not want_requeue:
        assert "not requeueing: requeued 10 times already" in err


def fake_torchrun(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "torchrun_args.txt"
    stub(tmp_path / "torchrun", f'printf \'%s\\n\' "$@" "store=${{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-}}" > {log}\n')
    return tmp_path / "torchrun", log


def launch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """launch.sh as tests/test_launch.py runs it, with no TORCH_DISABLE_SHARE_RDZV_TCP_STORE of the caller's."""
    return run_launch(args, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "", **env})


def test_max_restarts_reaches_torchrun(tmp_path):
    exe, log = fake_torchrun(tmp_path)
    proc = launch(["--max-restarts", "2", str(DEBUG_YAML)], {"TORCHRUN": str(exe)})
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().split("\n")  # one process of strategy none: under torchrun all the same
    assert "--max-restarts=2" in args and "--nproc_per_node=1" in args and "--standalone" in args
    assert "store=1" in args  # a restarted group must not read the dead attempt's addresses from the shared store
    env = {"TORCHRUN": str(exe), "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "SLURM_JOB_ID": "5"}
    proc = launch(["--max-restarts=1", "--nproc", "4", str(DEBUG_YAML)], env)
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().split("\n")
    assert {"--max-restarts=1", "--rdzv-backend=c10d", "--rdzv-id=5", "--nnodes=2", "--nproc_per_node=4"} <= set(args)
    assert any(a.startswith("--rdzv-endpoint=10.0.0.1:") for a in args)
    proc = launch(["--max-restarts", "-1", str(DEBUG_YAML)], {"TORCHRUN": str(exe)})
    assert proc.returncode == 2 and "--max-restarts must be an integer >= 0" in proc.stderr


RUN = ["parallel.strategy=ddp", "model.dropout=0.1", "checkpoint.every=2", "train.max_steps=6"]


@pytest.mark.slow
def test_lost_rank_restarts_and_matches_the_uninterrupted_run(tmp_path_factory, tmp_path):
    data = prepared_dataset(tmp_path_factory)
    straight, healed = tmp_path / "straight", tmp_path / "healed"
    env = {k: v for k, v in python_env().items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    ref = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
        + ["--config", str(DEBUG_YAML), *tiny_overrides(data, straight, *RUN)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = subprocess.run(
        ["bash", "launch.sh", "--nproc", "2", "--max-restarts", "2", str(DEBUG_YAML)]
        + tiny_overrides(data, healed, *RUN),
        cwd=REPO,
        env={**env, "PYTHON": sys.executable, "GPTRAIN_KILL": "5:1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "restart 1 of at most 2 (torchrun), requeue 0 (SLURM): resumed from step_000004" in out, out[-4000:]
    restarts = [{k: v for k, v in r.items() if k != "time"} for r in metrics(healed) if "restart" in r]
    assert restarts == [{"step": 4, "restart": 1, "requeue": 0, "resumed_from": "step_000004"}]
    want = train_losses(straight)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert train_losses(healed) == want  # bit for bit: same batches, same dropout masks, same reductions
