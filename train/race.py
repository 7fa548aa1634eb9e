"""`python -m train.race`: wall time to a target val loss, config against config, the way
modded-nanogpt's speedrun is measured: not tokens/s, but seconds until the val loss reaches a target.

    python -m train.race --data datasets/pydoc-bytes --target auto \\
        --configs configs/race-nanogpt.yaml,configs/race-fast.yaml
    python -m train.race --data DIR --target 1.45 --configs A.yaml,B.yaml --budget-s 600

Each config trains in turn, in this process, through the real loop (train.loop.run) on the same data,
with an evaluation every --eval-every steps on the same first --eval-tokens of the val split, and
stops at the first evaluation at or below the target. The time to the target is interpolated linearly
between the two evaluations around the crossing, on the loop's own train-time clock (the StepMeter's
ms/step, which leaves evaluation out); evaluation time is reported beside it. The target is a number,
or the val loss the first config reaches after N steps (--target-from-steps N; --target auto = the
first config's train.max_steps: the val loss the baseline reaches after its 1000 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.cli import run
from model.errors import UserError
from train.callbacks import TrainPruned
from train.config import Config, load_config


class RaceError(UserError):
    """A usage error of the race: one line, exit 2."""


@dataclass
class Point:
    """One evaluation: step, tokens seen, train seconds so far (wall, evaluation excluded), val loss, and
    the process's CPU seconds of the same training (a shared machine's load changes wall time, less so
    the CPU time of a one-thread run)."""

    step: int
    tokens: int
    seconds: float
    val_loss: float
    cpu_seconds: float = 0.0


@dataclass
class Crossing:
    step: float
    tokens: float
    seconds: float
    cpu_seconds: float


def crossing(points: list[Point], target: float) -> Crossing | None:
    """Where the val-loss curve first reaches `target`, interpolated linearly in step, tokens and train
    seconds between the last evaluation above it and the first at or below it. None: never reached."""
    for i, p in enumerate(points):
        if p.val_loss > target:
            continue
        if i == 0:
            return Crossing(p.step, p.tokens, p.seconds, p.cpu_seconds)
        q = points[i - 1]
        f = (q.val_loss - target) / (q.val_loss - p.val_loss)  # in (0, 1]: q is above the target, p not
        return Crossing(
            q.step + f * (p.step - q.step),
            q.tokens + f * (p.tokens - q.tokens),
            q.seconds + f * (p.seconds - q.seconds),
            q.cpu_seconds + f * (p.cpu_seconds - q.cpu_seconds),
        )
    return None


@dataclass
class Result:
    name: str
    points: list[Point] = field(default_factory=list)
    eval_s: float = 0.0  # wall seconds of the evaluations after step 0
    wall_s: float = 0.0  # the whole run: set-up, training and evaluation
    stopped: str = ""  # "target" | "budget" | "steps" | "done"

    @property
    def final(self) -> Point:
        return self.points[-1]


class RaceWatch:
    """The loop's EvalCallback for one racer. After each evaluation it reads the records the loop has
    just written to metrics.jsonl (log_every = eval_every, so a log record closes every evaluated
    interval): the train seconds come from the loop's ms_per_step (evaluation excluded by the loop's
    StepMeter), the evaluation's wall time from that log record's timestamp to now. It stops the run at
    the target, at `stop_step`, or once the train seconds pass the budget.

    It is also the run's `log`: the loop logs its train line (train.metrics.format_line, "step N/M | ...")
    just before the evaluation of that step, and the val line after it, so the process's CPU time at
    those lines splits training from evaluation."""

    TRAIN_LINE = re.compile(r"step\s+(\d+)/\d+ \| loss")

    def __init__(
        self,
        result: Result,
        metrics: Path,
        tokens_per_step: int,
        target,
        stop_step,
        budget_s,
        inner_log=print,
        clocks=(time.time, time.process_time),  # (wall, this process's CPU); tests pass their own
    ):
        self.result, self.metrics, self.tokens_per_step = result, metrics, tokens_per_step
        self.target, self.stop_step, self.budget_s = target, stop_step, budget_s
        self.offset, self.seconds, self.log_step, self.log_time = 0, 0.0, 0, None
        self.wall_clock, self.cpu_clock = clocks
        self.cpu, self.cpu_at, self.cpu_mark, self.inner_log = 0.0, {0: 0.0}, self.cpu_clock(), inner_log

    def log(self, msg: str) -> None:
        now = self.cpu_clock()
        train = self.TRAIN_LINE.match(msg)
        if train:  # the steps since the previous evaluation end here
            self.cpu += now - self.cpu_mark
            self.cpu_at[int(train.group(1))] = self.cpu
        elif msg.startswith("step 0 | val loss"):  # the untrained evaluation: training starts now
            self.cpu_mark = now
        self.inner_log(msg)

    def read(self) -> None:
        with open(self.metrics) as f:
            f.seek(self.offset)
            lines = f.readlines()
            self.offset = f.tell()
        for line in lines:
            r = json.loads(line)
            if "ms_per_step" in r:  # a log record: the interval since the previous one
                self.seconds += r["ms_per_step"] * (r["step"] - self.log_step) / 1000
                self.log_step, self.log_time = r["step"], r["time"]
            elif "val_loss" in r:
                step = r["step"]
                tokens = step * self.tokens_per_step
                cpu = self.cpu_at.get(step, self.cpu)
                self.result.points.append(Point(step, tokens, self.seconds, r["val_loss"], cpu))

    def after_eval(self, step: int, val_loss: float) -> bool:
        self.cpu_mark = self.cpu_clock()  # the evaluation is over: the next interval starts
        self.read()
        if self.log_time is not None and self.log_step == step:
            self.result.eval_s += max(0.0, self.wall_clock() - self.log_time)
        if self.target is not None and val_loss <= self.target:
            self.result.stopped = "target"
        elif self.stop_step is not None and step >= self.stop_step:
            self.result.stopped = "steps"
        elif self.budget_s is not None and self.seconds >= self.budget_s:
            self.result.stopped = "budget"
        return bool(self.result.stopped)


def race_config(path: str, data: str, out: Path, eval_every: int, eval_tokens: int, sets=()) -> Config:
    """The config as its file says, plus what the race fixes: the data, the evaluation cadence and val
    tokens (the same for every racer), a fresh run dir, and nothing that costs time besides training."""
    name = Path(path).stem
    cfg = load_config(path, list(sets))
    if cfg.data.mix:
        raise RaceError(f"{path}: data.mix is set; the race trains every config on --data alone")
    window = cfg.train.micro_batch * cfg.seq_len
    if eval_tokens % window:
        raise RaceError(
            f"--eval-tokens {eval_tokens} is not a multiple of {path}'s micro_batch x seq_len = {window}; "
            "every racer must be evaluated on the same val tokens"
        )
    overrides = [
        f"data.dir={data}",
        f"train.run_dir={out / name}",
        "train.resume=never",
        f"train.eval_every={eval_every}",
        f"train.eval_batches={eval_tokens // window}",
        f"logging.log_every={eval_every}",
        "logging.progress_bar=false",
        "logging.sample_every=0",
        "eval.hellaswag_every=0",
        "checkpoint.every=0",
        "checkpoint.keep_best=false",
        "checkpoint.save_final=false",
    ]
    return load_config(path, [*sets, *overrides])


def run_one(cfg: Config, name: str, target, stop_step, budget_s, log) -> Result:
    from train.loop import run

    result = Result(name)
    metrics = Path(cfg.train.run_dir) / "metrics.jsonl"
    watch = RaceWatch(result, metrics, cfg.train.tokens_per_step, target, stop_step, budget_s, log)
    wall0 = time.perf_counter()
    try:
        run(cfg, log=watch.log, callbacks=[watch])
        result.stopped = result.stopped or "done"
    except TrainPruned:
        pass  # the watch stopped it; result.stopped says why
    result.wall_s = time.perf_counter() - wall0
    watch.read()  # the last step's records (a run that ended on its own)
    return result


def host_line() -> str:
    import torch

    from data.machine import describe_cpu

    return f"{describe_cpu()} | torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_line() -> str:
    """The 1, 5 and 15 minute load averages: on a shared machine, how many other runnable processes
    stretched the wall seconds (the CPU seconds are the steadier figure)."""
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def table(results: list[Result], target: float) -> str:
    """The race's answer: one row per config, its time to the target and the ratio to the first's, in
    wall seconds (the figure) and in CPU seconds (the check against a shared machine's changing load)."""
    head = ("config", "steps", "tokens", "train s", "CPU s", "eval s", "final val", "CPU vs 1st", "vs first")
    rows = [f"{head[0]:<22}" + "".join(f" {h:>10}" for h in head[1:])]
    base = crossing(results[0].points, target)
    for r in results:
        c = crossing(r.points, target)
        if c is None:
            why = f"not reached ({r.final.step} steps, {r.stopped})"
            rows.append(f"{r.name:<22} {why:>43} {r.eval_s:>10.1f} {r.final.val_loss:>10.4f} {'-':>10} {'-':>10}")
            continue
        ratio = f"{c.seconds / base.seconds:.2f}" if base is not None and base.seconds > 0 else "-"
        cpu_ratio = f"{c.cpu_seconds / base.cpu_seconds:.2f}" if base is not None and base.cpu_seconds > 0 else "-"
        rows.append(
            f"{r.name:<22} {c.step:>10.0f} {c.tokens:>10,.0f} {c.seconds:>10.2f} {c.cpu_seconds:>10.2f} "
            f"{r.eval_s:>10.1f} {r.final.val_loss:>10.4f} {cpu_ratio:>10} {ratio:>10}"
        )
    return "\n".join(rows)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m train.race",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--data", required=True, help="a prepared dataset directory (python -m data.prepare)")
    ap.add_argument("--configs", required=True, help="comma-separated run files; the first is the baseline")
    ap.add_argument("--target", help="a val loss, or `auto`: the first config's val loss after its max_steps")
    ap.add_argument("--target-from-steps", type=int, metavar="N", help="target = the first config's val loss at N")
    ap.add_argument("--budget-s", type=float, help="stop a config after this many train seconds (default: none)")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between evaluations (default 25)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="val tokens per evaluation (default 16384)")
    ap.add_argument("--out", default="runs/race", help="run dirs go to OUT/<config name> (default runs/race)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="section.key=value",
        help="override every config, e.g. train.dtype=bfloat16 on a CPU with bf16 units, or train.max_steps=100 "
        "for a quick look (repeatable; the race's own evaluation and checkpoint settings win)",
    )
    ap.add_argument("--quiet", action="store_true", help="only the race's own lines, not the loop's log")
    return ap.parse_args(argv)


def plan(args) -> tuple[list[tuple[str, Config]], float | None, int | None]:
    """(name, config) per racer, the fixed target (or None) and the first config's target step."""
    paths = [p.strip() for p in args.configs.split(",") if p.strip()]
    if not paths:
        raise RaceError("--configs needs at least one run file")
    names = [Path(p).stem for p in paths]
    if len(set(names)) != len(names):
        raise RaceError(f"--configs: two run files share a name ({', '.join(names)}); their run dirs would clash")
    if not Path(args.data).is_dir():
        raise RaceError(f"--data {args.data} is not a directory; prepare one with python -m data.prepare")
    if args.eval_every < 1 or args.eval_tokens < 1 or (args.budget_s is not None and args.budget_s <= 0):
        raise RaceError("--eval-every and --eval-tokens must be >= 1, --budget-s > 0")
    if (args.target is None) == (args.target_from_steps is None):
        raise RaceError("give exactly one of --target LOSS|auto and --target-from-steps N")
    out = Path(args.out)
    racers = [
        (n, race_config(p, args.data, out, args.eval_every, args.eval_tokens, args.set))
        for n, p in zip(names, paths, strict=True)
    ]
    first_steps = racers[0][1].train.max_steps
    if args.target is not None and args.target != "auto":
        try:
            target = float(args.target)
        except ValueError:
            raise RaceError(f"--target takes a val loss or `auto`; got {args.target!r}") from None
        return racers, target, None
    n = first_steps if args.target == "auto" else args.target_from_steps
    if not 1 <= n <= first_steps or (n % args.eval_every and n != first_steps):
        raise RaceError(
            f"--target-from-steps {n}: must be in [1, {first_steps}] (the first config's train.max_steps) and a "
            f"multiple of --eval-every {args.eval_every}, so that an evaluation lands on it"
        )
    return racers, None, n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    racers, target, target_step = plan(args)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    log = (lambda msg: None) if args.quiet else say
    say(f"race on {args.data} | host: {host_line()} | {platform.python_implementation()} {platform.python_version()}")
    say(f"evaluation every {args.eval_every} steps on the first {args.eval_tokens:,} val tokens | {load_line()}")
    results = []
    for i, (name, cfg) in enumerate(racers):
        say(f"---- {name}: training (target {'from this run' if target is None else f'{target:.4f}'})")
        stop_step = target_step if i == 0 and target is None else None
        r = run_one(cfg, name, target, stop_step, args.budget_s, log)
        if target is None:
            at = [p for p in r.points if p.step == target_step]
            if not at:
                raise RaceError(f"{name} stopped ({r.stopped}) before step {target_step}: no target")
            target = at[0].val_loss
            say(f"target: val loss {target:.4f} = {name} after {target_step} steps")
        results.append(r)
        say(
            f"---- {name}: {r.final.step} steps, stopped: {r.stopped}, {r.wall_s:.0f} s in all (set-up, evaluation) "
            f"| {load_line()}"
        )
    say(f"\ntime to val loss {target:.4f} (train s: evaluation excluded; steps and tokens interpolated)")
    say(table(results, target))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
