"""HellaSwag during training (eval.hellaswag_every): the loop's results, exact resume, compile, torchrun.

The examples are tests/fixtures/hellaswag_mini.jsonl (12, written for the tests in the rowanz schema);
the model is the tiny one of train_helpers (bytes tokenizer, 32-token context: every example is cut
from the left, which the results count as `hellaswag_truncated`).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest
import torch
from train_helpers import (
    DEBUG_YAML,
    REPO,
    metrics,
    python_env,
    tiny_config,
    tiny_overrides,
    train_losses,
)

from data.hellaswag import read_jsonl
from data.tokenizer import get_tokenizer
from eval.hellaswag_score import hellaswag_eval
from model.io import load_model
from train.errors import ConfigError
from train.loop import run

FIXTURE = REPO / "tests" / "fixtures" / "hellaswag_mini.jsonl"
HS = ["eval.hellaswag_every=2", f"eval.hellaswag_data={FIXTURE}"]
KEYS = ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n", "hellaswag_truncated")
QUIET = dict(log=lambda m: None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hellaswag(run_dir) -> dict[int, dict]:
    """step -> the HellaSwag record of metrics.jsonl (without its time)."""
    return {r["step"]: {k: r[k] for k in KEYS} for r in metrics(run_dir) if "hellaswag_acc" in r}


class Recorder:
    """Stands in for TensorBoard's SummaryWriter and for a wandb run: what MetricsWriter sends them."""

    made: list[Recorder] = []

    def __init__(self, *args, **kwargs):
        self.scalars: list[tuple[str, float, int]] = []
        Recorder.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def log(self, values, step):
        self.scalars += [(k, v, step) for k, v in values.items()]

    def add_text(self, *args): ...

    def close(self): ...

    def finish(self): ...


def test_results_reach_the_console_metrics_tensorboard_wandb_and_the_checkpoint(data_dir, tmp_path, monkeypatch):
    """At step 0, every hellaswag_every steps and the last step: a console line, a metrics.jsonl record,
    TensorBoard and W&B scalars; the checkpoint's artifact metadata holds the last result beside val_loss.
    The numbers are those of hellaswag_eval on the saved weights."""
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Recorder
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: Recorder()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(Recorder, "made", [])
    lines: list[str] = []
    run_dir = tmp_path / "run"
    sinks = ["logging.tensorboard=true", "logging.wandb=true"]
    run(tiny_config(data_dir, run_dir, *HS, *sinks, "train.max_steps=5", "train.eval_every=5"), log=lines.append)

    got = hellaswag(run_dir)
    assert sorted(got) == [0, 2, 4, 5]
    for rec in got.values():
        assert rec["hellaswag_n"] == 12 and rec["hellaswag_truncated"] == 12
        assert 0 <= rec["hellaswag_acc"] <= 1 and 0 <= rec["hellaswag_acc_norm"] <= 1
    shown = [line for line in lines if line.startswith("step") and "hellaswag" in line]
    assert len(shown) == 4 and shown[-1] == (
        f"step 5 | hellaswag acc {got[5]['hellaswag_acc']:.4f} | acc_norm {got[5]['hellaswag_acc_norm']:.4f} "
        "(12 examples, 12 truncated to the context)"
    )
    assert len(Recorder.made) == 2  # a SummaryWriter and a wandb run
    for sink in Recorder.made:
        assert [(s, v) for t, v, s in sink.scalars if t == "hellaswag_acc_norm"] == [
            (s, got[s]["hellaswag_acc_norm"]) for s in (0, 2, 4, 5)
        ]

    model, meta = load_model(run_dir)  # the final checkpoint's artifact
    assert meta["hellaswag_step"] == 5 and meta["step"] == 5 and math.isfinite(meta["val_loss"])
    assert {k: meta[k] for k in KEYS} == got[5]
    counts = hellaswag_eval(model, get_tokenizer("bytes"), read_jsonl(FIXTURE))
    assert (counts.acc, counts.acc_norm) == (got[5]["hellaswag_acc"], got[5]["hellaswag_acc_norm"])


def test_resume_is_exact_with_hellaswag_on(data_dir, tmp_path):
    """Dropout on, val eval and HellaSwag interleaved: 6 steps straight == 3 steps (HellaSwag also at the
    stop, step 3) + resume to 6, bit for bit; and the metadata keeps the last result across a resume."""
    common = ["model.dropout=0.1", "train.eval_every=2", "schedule.total_steps=6", *HS]
    ref = tmp_path / "ref"
    run(tiny_config(data_dir, ref, "train.max_steps=6", *common), **QUIET)
    cut = tmp_path / "cut"
    run(tiny_config(data_dir, cut, "train.max_steps=3", *common), **QUIET)
    assert 3 in hellaswag(cut)  # the stop's own evaluation, which the reference never ran
    run(tiny_config(data_dir, cut, "train.max_steps=6", *common), **QUIET)  # resume: auto, from step 3

    assert sorted(train_losses(ref)) == list(range(1, 7))
    assert train_losses(cut) == train_losses(ref)  # exact float equality, every step
    want = hellaswag(ref)
    assert sorted(want) == [0, 2, 4, 6]
    assert {s: r for s, r in hellaswag(cut).items() if s != 3} == want

    run(tiny_config(data_dir, cut, "train.max_steps=7", *common[:-2]), **QUIET)  # HellaSwag off from here
    _, meta = load_model(cut)
    assert meta["step"] == 7 and meta["hellaswag_step"] == 6
    assert {k: meta[k] for k in KEYS} == want[6]


def test_bad_data_is_one_config_error_before_training(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"eval\.hellaswag_data=.*nope\.jsonl: no such file.*hellaswag_every=0"):
        run(tiny_config(data_dir, run_dir, *HS, f"eval.hellaswag_data={tmp_path / 'nope.jsonl'}"), **QUIET)
    bad = tmp_path / "bad.jsonl"
    doc = json.loads(FIXTURE.read_text().splitlines()[0])
    bad.write_text(json.dumps(doc) + "\n" + json.dumps({k: v for k, v in doc.items() if k != "endings"}) + "\n")
    with pytest.raises(ConfigError, match=rf"eval\.hellaswag_data={bad}: {bad}:2: missing field 'endings'"):
        run(tiny_config(data_dir, run_dir, *HS, f"eval.hellaswag_data={bad}"), **QUIET)
    assert not run_dir.exists()  # nothing started


def test_runs_under_compile(data_dir, tmp_path):
    """train.compile=true: the compiled blocks score HellaSwag (padded to one shape) inside the loop,
    with the eager model's result on the same (untrained) weights."""
    torch._dynamo.reset()
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run(tiny_config(data_dir, eager, *HS, "train.max_steps=1"), **QUIET)
    run(tiny_config(data_dir, compiled, *HS, "train.max_steps=1", "train.compile=true"), **QUIET)
    torch._dynamo.reset()
    got, want = hellaswag(compiled), hellaswag(eager)
    assert sorted(got) == [0, 1] and got[0] == want[0]
    assert got[1]["hellaswag_n"] == 12


# 11 examples over 2 ranks: rank 1 holds one fewer and scores a dummy batch (a sharded forward is a collective)
DIST = [*HS, "eval.hellaswag_limit=11", "train.max_steps=2"]


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> dict[int, dict]:
    run_dir = tmp_path_factory.mktemp("hellaswag") / "one"
    run(tiny_config(data_dir, run_dir, *DIST), **QUIET)
    return hellaswag(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])
def test_torchrun_two_ranks_sum_to_one_process(data_dir, one_process, tmp_path, strategy):
    """2 gloo ranks through `python -m train`: the counts of every evaluation equal one process's. FSDP:
    the rank split and the sum are the strategy's data-parallel rank and all-reduce whatever the layout,
    and FSDP's forward also needs both ranks to take part in every batch (11 examples: 6 and 5)."""
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    cmd += ["--config", str(DEBUG_YAML), *tiny_overrides(data_dir, two, *DIST, f"parallel.strategy={strategy}")]
    proc = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(one_process) == [0, 2] and one_process[0]["hellaswag_n"] == 11
    assert hellaswag(two) == one_process
