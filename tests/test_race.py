"""train.race: the crossing of a target val loss (interpolated, evaluation time excluded), a tiny race of
two configs end to end, the "not reached" case, usage errors, and the two shipped race configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from model.cli import run as run_command
from tests.train_helpers import REPO, one_thread
from train.race import Point, RaceWatch, Result, crossing, main

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

TINY = """model: {family: FAMILY, vocab_size: null, block_size: 32, n_layer: 1, n_head: 2, n_embd: 32}
optim: {lr: LR}
schedule: {warmup_steps: 2}
train: {max_steps: 12, tokens_per_step: 256, micro_batch: 8, dtype: float32, device: cpu}
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A test-written corpus (repetitive sentences a one-layer model learns within a few steps), bytes tokens."""
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("race") / "data"
    docs = [f"the cat number {i} sat on the mat and the dog number {i % 7} ran. " * 8 for i in range(300)]
    prepare(out, source=docs, tokenizer="bytes", val_tokens=4096, progress=False)
    return out


def tiny(tmp_path: Path, name: str, family: str = "gpt2", lr: float = 1e-2) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.replace("FAMILY", family).replace("LR", str(lr)))
    return str(path)


def test_crossing_interpolates_between_the_evaluations_around_the_target():
    # loss falls 4.0 -> 3.0 -> 2.0 at 0 / 10 / 20 s: 2.5 is crossed half-way through the second interval
    pts = [Point(0, 0, 0.0, 4.0), Point(100, 1000, 10.0, 3.0), Point(200, 2000, 20.0, 2.0)]
    c = crossing(pts, 2.5)
    assert (c.step, c.tokens, c.seconds) == pytest.approx((150, 1500, 15.0))
    assert crossing(pts, 3.0).seconds == pytest.approx(10.0)  # exactly at an evaluation
    assert crossing(pts, 1.0) is None  # never reached
    # the first crossing counts, not a later dip
    bumpy = [Point(0, 0, 0.0, 4.0), Point(10, 10, 1.0, 2.0), Point(20, 20, 2.0, 3.0), Point(30, 30, 3.0, 1.0)]
    assert crossing(bumpy, 2.5).seconds == pytest.approx(0.75)


def test_watch_takes_train_seconds_from_the_loop_clock_not_the_evaluations(tmp_path):
    """Evaluations take 100 s each here, of wall and of CPU time; neither counts toward the target."""
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"time": 1000.0, "step": 0, "val_loss": 4.0},
        {"time": 1015.0, "step": 10, "loss": 3.5, "ms_per_step": 1000.0},  # 10 steps x 1 s
        {"time": 1110.0, "step": 10, "val_loss": 3.0},  # a 100 s evaluation
        {"time": 1135.0, "step": 20, "loss": 2.5, "ms_per_step": 2000.0},  # 10 steps x 2 s
        {"time": 1230.0, "step": 20, "val_loss": 2.0},
    ]
    wall, cpu, lines = [0.0], [0.0], []
    result = Result("x")
    watch = RaceWatch(
        result, metrics, 64, target=2.5, stop_step=None, budget_s=None, inner_log=lines.append,
        clocks=(lambda: wall[0], lambda: cpu[0]),
    )  # fmt: skip

    def at(t, msg=None, step=None, loss=None):
        cpu[0], wall[0] = t, 1000.0 + t
        return watch.log(msg) if msg else watch.after_eval(step, loss)

    metrics.write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    at(5.0, "step 0 | val loss 4.0000")  # the untrained evaluation ends: training starts
    at(15.0, "step 10/20 | loss 3.5000 | lr 1e-3")  # 10 CPU s of training
    at(115.0, "step 10 | val loss 3.0000 (best)")  # 100 CPU s of evaluation
    assert at(115.0, step=10, loss=3.0) is False
    with open(metrics, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records[3:]))
    at(135.0, "step 20/20 | loss 2.5000 | lr 1e-4")  # 20 more
    assert at(235.0, step=20, loss=2.0) is True and result.stopped == "target"
    assert [(p.step, p.tokens, p.seconds, p.cpu_seconds) for p in result.points] == [
        (0, 0, 0.0, 0.0),
        (10, 640, 10.0, 10.0),
        (20, 1280, 30.0, 30.0),
    ]
    c = crossing(result.points, 2.5)
    assert (c.seconds, c.cpu_seconds) == pytest.approx((20.0, 20.0))  # 10 + half of the 20 s interval
    assert result.eval_s == pytest.approx(200.0)  # wall: from each log record's time to the end of its evaluation
    assert len(lines) == 4  # the loop's lines still reach the console


def race(capsys, *args) -> tuple[int, str, str]:
    rc = run_command(main, list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def ratio_of(ratio: str, num: str, den: str) -> bool:
    """`ratio` (2 decimals) is num / den, both printed to 2 decimals: within what the rounding allows."""
    n, d, r = float(num), float(den), float(ratio)
    return (n - 0.005) / (d + 0.005) - 0.005 <= r <= (n + 0.005) / max(d - 0.005, 1e-9) + 0.005


def rows(out: str) -> dict[str, list[str]]:
    table = out[out.index("\nconfig ") :].strip().splitlines()[1:]
    return {line.split()[0]: line.split() for line in table}


def test_a_tiny_race_prints_the_table_and_the_ratio_to_the_first(corpus, tmp_path, capsys):
    a, b = tiny(tmp_path, "slow", lr=3e-3), tiny(tmp_path, "fast", "modern", lr=2e-2)
    rc, out, err = race(
        capsys, "--data", str(corpus), "--target", "auto", "--configs", f"{a},{b}",
        "--eval-every", "4", "--eval-tokens", "512", "--out", str(tmp_path / "runs"), "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    assert "avx512_bf16" in out and "CPU" in out
    # the load average at the start and after each racer: what stretched the wall seconds of a shared machine
    loads = re.findall(
        r"^(evaluation every|---- slow: \d+ steps|---- fast: \d+ steps).* \| load average [\d.]+, [\d.]+, [\d.]+$",
        out,
        re.M,
    )
    assert len(loads) == 3, out
    target = float(re.search(r"target: val loss (\d+\.\d+) = slow after 12 steps", out).group(1))
    table = rows(out)
    assert table["slow"][-2:] == ["1.00", "1.00"]
    assert float(table["slow"][6]) == pytest.approx(target, abs=1e-4)  # the baseline's final val loss
    fast = table["fast"]  # reached: its ratio is its train seconds over the baseline's
    assert ratio_of(fast[-1], fast[3], table["slow"][3])
    assert float(fast[6]) <= target  # stopped at the first evaluation at or below the target
    assert ratio_of(fast[-2], fast[4], table["slow"][4])
    assert float(fast[1]) < 12 and 0 < float(fast[4])
    # each racer ran in its own fresh run dir with an evaluation every 4 steps and a log record closing each
    recs = [json.loads(x) for x in (tmp_path / "runs" / "slow" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 4, 8, 12]
    assert [r["step"] for r in recs if "ms_per_step" in r] == [4, 8, 12]


def test_a_target_out_of_reach_is_reported_not_reached_and_set_overrides_every_config(corpus, tmp_path, capsys):
    a = tiny(tmp_path, "only")
    rc, out, err = race(
        capsys, "--data", str(corpus), "--target", "0.01", "--configs", a,
        "--eval-every", "3", "--eval-tokens", "256", "--out", str(tmp_path / "runs"), "--quiet",
        "--set", "train.max_steps=6",
    )  # fmt: skip
    assert rc == 0, err
    row = " ".join(rows(out)["only"])
    assert "not reached (6 steps, done)" in row and row.endswith("- -")  # no time, no ratios


def test_budget_stops_each_config_at_the_first_evaluation_past_it(corpus, tmp_path, capsys):
    """--budget-s: a config stops at the first evaluation after its train seconds pass the budget; a
    budget below any step's time is passed by the first evaluation after step 0 (no clock is read here)."""
    a, b = tiny(tmp_path, "a"), tiny(tmp_path, "b", lr=2e-2)
    rc, out, err = race(
        capsys, "--data", str(corpus), "--target", "0.01", "--configs", f"{a},{b}", "--budget-s", "1e-9",
        "--eval-every", "2", "--eval-tokens", "256", "--out", str(tmp_path / "runs"), "--quiet",
        "--set", "train.max_steps=8",
    )  # fmt: skip
    assert rc == 0, err
    for name in ("a", "b"):
        assert "not reached (2 steps, budget)" in " ".join(rows(out)[name])
        recs = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs if "val_loss" in r] == [0, 2]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--target", "auto", "--target-from-steps", "4"], "exactly one of"),
        (["--target", "low"], "--target takes a val loss"),
        (["--target-from-steps", "5"], "multiple of --eval-every"),
        (["--target", "auto", "--eval-tokens", "100"], "not a multiple of"),
        (["--target", "auto", "--budget-s", "0"], "--budget-s > 0"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(corpus, tmp_path, capsys, args, says):
    a = tiny(tmp_path, "a")
    rc, out, err = race(capsys, "--data", str(corpus), "--configs", a, "--eval-every", "4", *args)
    assert rc == 2
    assert err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_missing_data_dir_is_a_usage_error(tmp_path, capsys):
    rc, _, err = race(capsys, "--data", str(tmp_path / "nope"), "--target", "1", "--configs", tiny(tmp_path, "a"))
    assert rc == 2 and "is not a directory" in err


def test_the_race_configs_load_and_the_baseline_is_the_issue_recipe():
    from train.config import load_config

    base = load_config(REPO / "configs" / "race-nanogpt.yaml")
    m, o, s, t = base.model, base.optim, base.schedule, base.train
    assert (m.family, m.n_layer, m.n_embd, m.n_head, m.block_size, m.dropout) == ("gpt2", 4, 256, 4, 256, 0.0)
    assert m.vocab_size is None and base.data.dir == "datasets/pydoc-bytes"  # the dataset's bytes vocabulary
    assert (t.micro_batch, t.tokens_per_step, t.max_steps, t.dtype) == (8, 2048, 1000, "float32")
    assert (o.lr, list(o.betas)) == (1e-3, [0.9, 0.99])
    assert (s.name, s.warmup_steps, s.min_lr_ratio) == ("cosine", 50, 0.1)
    fast = load_config(REPO / "configs" / "race-fast.yaml")
    assert fast.train.dtype == "auto" and fast.data.dir == base.data.dir  # bf16 where the CPU has bf16 units
    assert fast.train.micro_batch * fast.seq_len == t.micro_batch * base.seq_len  # same --eval-tokens fit both


def test_the_moe_racer_matches_race_fast_in_active_parameters_and_in_everything_else():
    """race-moe against race-fast is a fair race: the same active parameters (to within the routers),
    the same data, batch, optimizer and schedule; only the FFN is a mixture of experts."""
    import dataclasses

    from model.gpt import GPT
    from train.config import load_config

    fast, moe = (load_config(REPO / "configs" / f"race-{n}.yaml") for n in ("fast", "moe"))
    models = [GPT(dataclasses.replace(c.model, vocab_size=257)) for c in (fast, moe)]
    dense, sparse = (m.num_params(active=True) for m in models)
    routers = moe.model.n_layer * moe.model.n_embd * moe.model.n_experts  # one (E, C) router per block
    assert sparse - dense == routers
    assert models[1].num_params() > 2.5 * models[0].num_params()  # the experts hold far more than a token uses
    for section in ("data", "optim", "schedule"):
        assert getattr(fast, section) == getattr(moe, section), section
    keep = ("max_steps", "tokens_per_step", "micro_batch", "dtype", "eval_every", "eval_batches")
    assert [getattr(fast.train, k) for k in keep] == [getattr(moe.train, k) for k in keep]
    moe_fields = {f.name for f in dataclasses.fields(moe.model) if f.name.startswith(("moe_", "n_experts"))}
    for f in dataclasses.fields(fast.model):
        if f.name not in moe_fields:
            assert getattr(fast.model, f.name) == getattr(moe.model, f.name), f.name
