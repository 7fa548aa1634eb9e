"""Every command: a user error is one line on stderr and exit code 2, with no traceback; a bug keeps its
traceback. One command or more of each package, each in a fresh process as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True)


def assert_user_error(proc: subprocess.CompletedProcess, says: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr and len(lines) == 1 and says in lines[0], proc.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (("data.prepare", "--source", "no/such/dir", "--tokenizer", "bytes", "--out", "{tmp}/o"), "no/such/dir"),
        (("data.inspect", "{tmp}/missing", "--steps", "1"), "does not exist"),
        (("train", "--config", "configs/debug.yaml", "data.dir={tmp}/none", "train.run_dir={tmp}/r"), "data.prepare"),
        (("train", "--config", "configs/debug.yaml", "train.max_steps=ten"), "train.max_steps"),
        (("train.sweep", "--config", "configs/debug.yaml", "--space", "{tmp}/none.yaml"), "none.yaml"),
        (("eval.sample", "--ckpt", "{tmp}/none"), "does not exist"),
    ],
    ids=["data.prepare", "data.inspect", "train-missing-data", "train-config", "train.sweep", "eval.sample"],
)
def test_a_user_error_is_one_line_and_exit_2(tmp_path, args, says):
    assert_user_error(run(*(a.replace("{tmp}", str(tmp_path)) for a in args)), says.replace("{tmp}", str(tmp_path)))


def test_the_runner_under_torchrun_and_on_a_bug(monkeypatch, capsys):
    """model.cli.run: rank 0 alone prints an error every rank raises, and the other ranks wait before
    they exit (torchrun stops every rank once one exits: rank 0 must get to print first); a rank's own
    error is printed by that rank at once; a config error says so; a bug (not a UserError) propagates
    with its traceback."""
    import model.cli
    from model.cli import run as run_command
    from train.errors import ConfigError, TrainError

    waits = []
    monkeypatch.setattr(model.cli.time, "sleep", waits.append)

    def raising(error):
        def main(argv):
            raise error

        return main

    monkeypatch.setenv("RANK", "1")
    assert run_command(raising(TrainError("no data"))) == 2
    assert capsys.readouterr().err == ""
    assert waits == [model.cli.PEER_ERROR_GRACE_S] and waits[0] >= 1
    own = TrainError("no GPU here")
    own.every_rank_reports = True
    assert run_command(raising(own)) == 2
    assert capsys.readouterr().err == "error on rank 1: no GPU here\n"
    monkeypatch.setenv("RANK", "0")
    assert run_command(raising(ConfigError("unknown key 'x'")), prog="p") == 2
    assert capsys.readouterr().err == "p: config error: unknown key 'x'\n"
    assert len(waits) == 1  # neither a rank's own error nor rank 0 waits
    with pytest.raises(KeyError):
        run_command(raising(KeyError("a bug")))
