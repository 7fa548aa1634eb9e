"""A test-only hook: the crash tests (tests/test_crash.py, tests/test_train_checkpoint.py,
tests/test_dist_elastic.py) kill a checkpoint save at a chosen point, as a power cut would, and check that
the run directory still resumes from the previous complete checkpoint.

With GPTRAIN_FAULT=POINT@STEP in the environment, crash_point(POINT, STEP) SIGKILLs its own process. The
points of train/checkpoint.py's save, in order:
    state    state/, model/ and the RNG files are in the temporary directory; train_state.pt is not
    publish  the temporary directory is complete; not yet renamed to step_N
    latest   renamed to step_N; `latest` still names the previous checkpoint
    prune    `latest` (and `best`) updated; older checkpoints not yet pruned
and, at a resume that converts (CheckpointManager.load), with GPTRAIN_FAULT=convert@STEP (the checkpoint's):
    convert  the neutral form of step_STEP is written under its temporary name; not yet published
Without the variable, crash_point does nothing: the variable is read once, at import.

The restart test (tests/test_train_restart.py) loses a rank mid-run: with GPTRAIN_KILL=STEP:RANK,
kill_point(STEP, RANK) SIGKILLs that rank after the backward of training step STEP, on the first attempt
only (torchrun's TORCHELASTIC_RESTART_COUNT is 0 or unset), so that the restarted job runs through.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "GPTRAIN_FAULT"
KILL_ENV = "GPTRAIN_KILL"
_ASKED = os.environ.get(FAULT_ENV)


def crash_point(point: str, step: int) -> None:
    """Die here when GPTRAIN_FAULT names this point and step (see the module docstring)."""
    if _ASKED is not None and _ASKED == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def kill_point(step: int, rank: int) -> None:
    """Die here when GPTRAIN_KILL names this step and rank, on a job's first attempt (module docstring)."""
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and os.environ.get(KILL_ENV) == f"{step}:{rank}":
        os.kill(os.getpid(), signal.SIGKILL)
