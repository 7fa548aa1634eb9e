"""The heartbeat file and the hang watchdog (train/watchdog.py) through the real `python -m train`.

heartbeat  one process: RUN/heartbeat.json names the last step, the world size and a recent time
hang       2 DDP ranks (gloo); in step 3 rank 0 waits inside an all-reduce that rank 1, asleep
           (GPTRAIN_HANG, the test-only hook), never joins: both ranks dump their stacks to RUN/hang/,
           rank 0's name the collective frame it waits in, rank 1's the sleeping frame, rank 0 logs one
           line naming rank 1, and the job exits non-zero instead of waiting for the collective
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_helpers import DEBUG_YAML, REPO, prepared_dataset, python_env, tiny_config, tiny_overrides

from train.loop import run
from train.watchdog import EXIT_HANG, HANG_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_dataset(tmp_path_factory)


def test_heartbeat_names_the_last_step(data, tmp_path):
    run(tiny_config(data, tmp_path, "train.max_steps=3"), log=lambda m: None)
    beat = json.loads((tmp_path / "heartbeat.json").read_text())
    assert beat["step"] == 3 and beat["world_size"] == 1 and beat["max_steps"] == 3
    assert beat["time"] >= (tmp_path / "metrics.jsonl").stat().st_mtime - 60


@pytest.mark.slow
def test_hang_in_a_collective_dumps_stacks_and_exits(data, tmp_path, monkeypatch):
    monkeypatch.setenv(HANG_ENV, "3:1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    cmd += ["--config", str(DEBUG_YAML), *tiny_overrides(data, tmp_path, "parallel.strategy=ddp")]
    cmd += ["train.max_steps=20", "train.step_timeout_s=10"]
    # the timeout is the margin: without the watchdog, gloo waits 30 minutes in the collective
    proc = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"exiting with {EXIT_HANG}" in out and "ranks that did not arrive: [1]" in out, out[-3000:]
    asleep = (tmp_path / "hang" / "rank_00001.txt").read_text()
    assert asleep.startswith("rank 1 ") and "last_step 2 waiting_in -" in asleep and "maybe_hang" in asleep
    waiting = (tmp_path / "hang" / "rank_00000.txt").read_text()
    assert "last_step 2 waiting_in all_reduce" in waiting
    assert "distributed_c10d.py" in waiting and "in all_reduce" in waiting  # the frame it waits in
