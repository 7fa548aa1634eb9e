"""FSDP and DeepSpeed through the real `python -m train` under torchrun (2 gloo ranks on the CPU):
prepared data, the LR schedule, evaluation and the checkpoint manager, against the one-process loop.

    FSDP       2 ranks (docs/distributed.md's launch.sh command); SIGTERM reaches ONE rank mid-run: every
               rank saves the same step and exits 0;
               then 1 rank (torchrun --nproc_per_node=1) resumes that checkpoint: the losses continue
               those of the uninterrupted one-process run
    DeepSpeed  2 ranks (ZeRO-2), eval and checkpoints: the one-process run's losses; the command is
               docs/distributed.md's (`DS_ACCELERATOR=cpu bash launch.sh --nproc 2 --deepspeed ...`)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fresh_interpreter, require_extra
from docs_helpers import documented, run_documented
from train_helpers import DEBUG_YAML, REPO, metrics, prepared_dataset, python_env, tiny_config, tiny_overrides

from model.io import load_model
from train.loop import run

pytestmark = pytest.mark.slow

# fp32, dropout 0: only the floating-point reduction order differs (per-rank partial sums,
# reduce-scatter / all-reduce, 2 ranks x 1 micro-batch vs 1 x 2); such runs agree to ~1e-6.
LOSS_TOL = 1e-5
# A real schedule whose length does not depend on train.max_steps, so that a run stopped early and
# resumed with another max_steps follows the reference's learning rates: warmup 2, cosine to step 12.
COMMON = ["schedule.total_steps=12", "train.eval_every=4", "checkpoint.every=4", "checkpoint.keep_last=2"]
REF_STEPS = 40
# train.eval_batches counts per rank (rank r takes the r-th micro-batch of each window of the val
# split): 2 ranks x 2 batches evaluate exactly the 4 batches of one process.
EVAL_1, EVAL_2 = "train.eval_batches=4", "train.eval_batches=2"
FSDP_DOC_COMMAND = "bash launch.sh --nproc 2 configs/debug.yaml parallel.strategy=fsdp train.run_dir=runs/fsdp"
DEEPSPEED_DOC_COMMAND = (
    "DS_ACCELERATOR=cpu bash launch.sh --nproc 2 --deepspeed configs/debug.yaml train.run_dir=runs/zero2"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> list[dict]:
    """The uninterrupted one-process run (parallel.strategy=none), in this process."""
    run_dir = tmp_path_factory.mktemp("dist-loop") / "ref"
    run(tiny_config(data, run_dir, *COMMON, EVAL_1, f"train.max_steps={REF_STEPS}"), log=lambda m: None)
    return metrics(run_dir)


def losses(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def assert_same_curve(got: list[dict], want: list[dict], last: int) -> None:
    """Every step's loss and every evaluation of the reference up to `last` (a run also evaluates
    at its own last step, which the longer reference may not have)."""
    for key in ("loss", "val_loss"):
        g, w = losses(got, key), losses(want, key)
        steps = [s for s in sorted(w) if s <= last]
        assert set(steps) <= set(g) and (key == "val_loss" or sorted(g) == steps), (key, sorted(g), steps)
        for s in steps:
            assert abs(g[s] - w[s]) < LOSS_TOL, (key, s, g[s], w[s])


def logged_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl, read while the run writes it (a line may be incomplete)."""
    path, step = run_dir / "metrics.jsonl", 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                step = max(step, json.loads(line).get("step", 0) if "loss" in line else 0)
            except json.JSONDecodeError:
                pass
    return step


def torchrun_cmd(nproc: int, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "train",
        "--config",
        str(DEBUG_YAML),
        *tiny_overrides(data, run_dir, *COMMON, *extra),
    ]


def torchrun(nproc: int, data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        torchrun_cmd(nproc, data, run_dir, *extra),
        cwd=REPO,
        env={**python_env(), "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (from /proc: the agent's children)."""
    try:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except FileNotFoundError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def test_fsdp_sigterm_on_one_rank_then_resume_on_one_rank(data, reference, tmp_path):
    run_dir = tmp_path / "fsdp"
    log_out, log_err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    # max_steps far beyond where the signal lands: the run only ends by the signal
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        # docs/distributed.md's FSDP command, tiny overrides appended; bash execs the launcher, so the
        # ranks are proc's children (fresh interpreters: a fork server's child is not its caller's)
        proc = subprocess.Popen(
            [*documented(FSDP_DOC_COMMAND), *tiny_overrides(data, run_dir, *COMMON, EVAL_2, "train.max_steps=100000")],
            cwd=REPO,
            env=fresh_interpreter(python_env()),
            stdout=fo,
            stderr=fe,
        )
    try:
        # in the training loop on every rank: step 2 has been logged (the log needs an all-reduce)
        wait_for(lambda: logged_step(run_dir) >= 2, proc, "step 2")
        rank1 = wait_for(lambda: worker_pid(proc.pid, 1), proc, "rank 1's pid")
        os.kill(rank1, signal.SIGTERM)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = log_out.read_text(), log_err.read_text()
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-5000:]}"  # every rank exited 0
    assert "SIGTERM received" in err  # on rank 1
    recs = metrics(run_dir)
    stopped = max(losses(recs, "loss"))
    assert stopped + 2 <= REF_STEPS, stopped
    # every rank took part in the save of the same step: it is complete and it is the latest
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{stopped:06d}"
    # each rank wrote its own RNG state into that same checkpoint
    assert sorted(p.name for p in (ckpts / f"step_{stopped:06d}").glob("rng_rank*")) == [
        "rng_rank00000.pt",
        "rng_rank00001.pt",
    ]
    assert not list(ckpts.glob(".tmp*"))
    assert_same_curve(recs, reference, stopped)

    # the same run dir, one rank: FSDP reshards the 2-rank checkpoint onto 1 rank
    last = stopped + 2
    second = torchrun(1, data, run_dir, "parallel.strategy=fsdp", EVAL_1, f"train.max_steps={last}")
    assert f"resumed from {ckpts / f'step_{stopped:06d}'}" in second.stdout + second.stderr
    assert_same_curve(metrics(run_dir), reference, last)
    model, meta = load_model(run_dir)  # the final checkpoint opens as a model artifact
    assert meta["step"] == last and model.config.n_layer == 2


def test_deepspeed_trains_evaluates_and_checkpoints_through_the_loop(data, reference, tmp_path):
    require_extra("deepspeed", "deepspeed")
    run_dir = tmp_path / "ds"
    # docs/distributed.md's command (ZeRO-2, the default stage), tiny overrides appended
    shown = documented(DEEPSPEED_DOC_COMMAND)
    assert shown[0] == "DS_ACCELERATOR=cpu" and "--deepspeed" in shown
    proc = run_documented(DEEPSPEED_DOC_COMMAND, tiny_overrides(data, run_dir, *COMMON, EVAL_2, "train.max_steps=4"))
    assert "parallel.strategy=deepspeed" in proc.stderr and "zero_stage" not in " ".join(shown)
    assert_same_curve(metrics(run_dir), reference, 4)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"
    model, meta = load_model(run_dir)
    assert meta["step"] == 4 and model.config.n_layer == 2
