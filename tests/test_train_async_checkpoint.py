"""Asynchronous checkpoints (checkpoint.async_save) through the real loop, one process, a save every step
so that one is always in flight. One chain of runs in one test, each continuing the same run directory:

    reference  the uninterrupted run, blocking saves (in-process)
    SIGTERM    async: SIGTERM at step 3 (sent from the log callback); run() returns only after the
               save in flight is complete: `latest` names step 3, complete
    kill -9    twice (`python -m train`), at a point of the writer thread drawn at random (train/faults.py:
               before train_state.pt, before the rename, before `latest`, before pruning) at a step drawn
               at random, while the main thread trains on: `latest` names a complete checkpoint, the
               killed one only when it was complete
    finish     async (in-process): the losses of every step are the reference's, bit for bit
"""

from __future__ import annotations

import os
import random
import signal

import pytest
from train_helpers import prepared_dataset, run_cli, tiny_config, tiny_overrides, train_losses

from train.loop import run

STEPS = 10
COMMON = ["checkpoint.every=1", "checkpoint.keep_last=3", f"train.max_steps={STEPS}", "model.dropout=0.1"]
ASYNC = [*COMMON, "checkpoint.async_save=true"]
POINTS = ["state", "publish", "latest", "prune"]  # train/faults.py, in the order of a save

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # two `python -m train` processes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_dataset(tmp_path_factory)


def latest(run_dir) -> int:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / name / "train_state.pt").is_file(), f"latest names {name}, incomplete"
    return int(name.removeprefix("step_"))


def test_async_saves_survive_sigterm_and_kill_9(data, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    run(tiny_config(data, ref, *COMMON), log=lambda m: None)
    want = train_losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))

    got = tmp_path / "got"

    def term_at_3(line: str) -> None:
        if line.startswith(f"step  3/{STEPS}"):
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler: save at the end of this step, stop

    out = run(tiny_config(data, got, *ASYNC), log=term_at_3)
    assert out["stopped"] == "SIGTERM" and out["step"] == 3
    assert latest(got) == 3  # the stop's own save was in flight when the loop ended, and was finished

    seed = int(os.environ.get("GPTRAIN_CHAOS_SEED") or random.randrange(2**16))  # a failure's seed replays it
    rng = random.Random(seed)
    resumed = 3
    for _ in range(2):
        step, point = rng.randint(resumed + 1, resumed + 3), rng.choice(POINTS)
        why = f"seed {seed}: kill at {point}@{step}"
        monkeypatch.setenv("GPTRAIN_FAULT", f"{point}@{step}")
        killed = run_cli(["--config", "configs/debug.yaml", *tiny_overrides(data, got, *ASYNC)])
        assert killed.returncode == -signal.SIGKILL, f"{why}\n{killed.stderr[-3000:]}"
        resumed = latest(got)
        # complete before the kill: the previous save; the killed one only once `latest` was written
        assert resumed == (step if point == "prune" else step - 1), why
        assert not (got / "checkpoints" / f"step_{step:06d}").exists() or point in ("latest", "prune"), why
    monkeypatch.delenv("GPTRAIN_FAULT")

    out = run(tiny_config(data, got, *ASYNC), log=lambda m: None)
    assert out["step"] == STEPS and out["stopped"] == "done"
    assert train_losses(got) == want, f"seed {seed}"  # every step, bit for bit, across four processes
