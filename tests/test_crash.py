"""A real SIGKILL while a checkpoint is being written: the next run resumes from a complete checkpoint,
`latest` never names a missing (or half-written) directory, no temporary directory is ever taken for a
checkpoint, and the losses are exactly those of the uninterrupted run.

Two ways to land the kill inside a save:
- the test-only fault hook: GPTRAIN_FAULT="<point>@<step>" makes the process SIGKILL itself at that
  point of CheckpointManager.save (state, publish, latest, prune: see train/checkpoint.py);
- from outside, at whatever moment a temporary checkpoint directory is seen (checkpoint.every=1).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import DEBUG_YAML, REPO, prepared_dataset, python_env, tiny_config, tiny_overrides

from train.loop import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS = 6
# every step checkpoints; keep_last=2 makes the save prune, so the "prune" point is reached
COMMON = ["checkpoint.every=1", "checkpoint.keep_last=2", f"train.max_steps={STEPS}"]
STEP_DIR = re.compile(r"^step_(\d+)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, float]:
    from train_helpers import train_losses

    run_dir = tmp_path_factory.mktemp("crash") / "ref"
    run(tiny_config(data, run_dir, *COMMON), log=lambda m: None)
    return train_losses(run_dir)


def train_cmd(data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "train", "--config", str(DEBUG_YAML), *tiny_overrides(data, run_dir, *COMMON)]


def check_invariants(run_dir: Path) -> int | None:
    """What any crash must leave: `latest` (if any) names a complete step directory. Returns its step."""
    ckpts = run_dir / "checkpoints"
    latest = ckpts / "latest"
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    m = STEP_DIR.match(name)
    assert m, f"latest names {name!r}, not a step directory"
    assert (ckpts / name / "train_state.pt").is_file(), f"latest names {name}, which is missing or incomplete"
    assert (ckpts / name / "model").is_dir(), f"{name} has no model/"
    return int(m.group(1))


def resumed_from(output: str) -> str | None:
    m = re.search(r"resumed from (\S+) at step (\d+)", output)
    return m.group(1) if m else None


def assert_final(run_dir: Path, reference: dict[int, float]) -> None:
    from train_helpers import train_losses

    assert check_invariants(run_dir) == STEPS
    # bit-for-bit: one process, same seed; every RNG, the loader position and the schedule are restored
    assert train_losses(run_dir) == reference
    ckpts = run_dir / "checkpoints"
    # a crashed save's temporary directory was cleaned up, never taken for a checkpoint
    assert not [p.name for p in ckpts.iterdir() if p.is_dir() and (".tmp" in p.name or ".old" in p.name)]


# (point, step): the fault, and the step `latest` must name afterwards
FAULTS = [("state", 2, 1), ("publish", 3, 2), ("latest", 4, 3), ("prune", 5, 5)]


def test_sigkill_at_each_point_of_a_checkpoint_save(data, reference, tmp_path):
    """One run dir, killed once at each point of the save, resumed each time, finished at the end."""
    run_dir = tmp_path / "faults"
    for point, step, latest_after in FAULTS:
        before = check_invariants(run_dir)
        proc = subprocess.run(
            train_cmd(data, run_dir),
            cwd=REPO,
            env={**python_env(), "GPTRAIN_FAULT": f"{point}@{step}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -signal.SIGKILL, (
            f"GPTRAIN_FAULT={point}@{step}: expected the process to SIGKILL itself, got exit "
            f"{proc.returncode}\n{proc.stderr[-3000:]}"
        )
        if before is not None:  # this run resumed where the previous crash left `latest`
            assert resumed_from(proc.stdout + proc.stderr) == str(run_dir / "checkpoints" / f"step_{before:06d}")
        assert check_invariants(run_dir) == latest_after, point
    proc = subprocess.run(train_cmd(data, run_dir), cwd=REPO, env=python_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed_from(proc.stdout + proc.stderr) == str(run_dir / "checkpoints" / "step_000005")
    assert_final(run_dir, reference)


def kill_during_a_save(cmd: list[str], ckpts: Path, skip: int) -> int:
    """Start the run and SIGKILL it as soon as its (skip+1)-th temporary checkpoint directory is seen.
    Returns the exit code (0 if the run ended before that)."""
    seen: set[str] = set()
    proc = subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            try:
                names = os.listdir(ckpts)
            except FileNotFoundError:
                names = []
            seen.update(n for n in names if ".tmp" in n and n.startswith("."))
            if len(seen) > skip:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)  # a tiny model's save holds its temporary directory far longer
        return proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigkill_from_outside_during_saves(data, reference, tmp_path):
    """Killed from outside while a temporary checkpoint directory exists, twice (in the first save a run
    makes, then in the third), then run to the end."""
    run_dir = tmp_path / "outside"
    cmd = train_cmd(data, run_dir)
    kills = 0
    for skip in (0, 2):
        before = check_invariants(run_dir)
        code = kill_during_a_save(cmd, run_dir / "checkpoints", skip)
        kills += code == -signal.SIGKILL
        after = check_invariants(run_dir)
        assert after is None or before is None or after >= before
        if after == STEPS:
            break
    assert kills >= 1, "no kill landed inside a save"
    proc = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_final(run_dir, reference)
