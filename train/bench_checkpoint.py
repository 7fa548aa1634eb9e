"""`python -m train.bench_checkpoint`: what a checkpoint costs the training loop, blocking vs asynchronous
(checkpoint.async_save), and what the spike guard's extra host sync per step costs.

    python -m train.bench_checkpoint --config configs/debug.yaml     # the CPU demo's model and batch
    python -m train.bench_checkpoint --config configs/debug.yaml --every 10 --cycles 3

Runs the real step (train.loop.train_step) on random tokens through the real CheckpointManager of
parallel.strategy=none (DCP shards + the model artifact), in three loops of cycles x every steps: no
checkpoint, a blocking checkpoint every `every` steps, an asynchronous one. Per mode: how long each
save() call holds the loop (blocking: the whole write; async: the copy to CPU memory, plus any wait
for the previous save) and the median step, which shows what the writer thread takes from the steps
(the GIL, memory bandwidth, cores). The last line: the median step with and without the guard's decision (one
all-reduce and one .item() of the loss and grad norm per step: SpikeGuard.admit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from data.machine import describe_cpu
from model import GPT
from model.cli import run
from model.dtypes import short
from train.checkpoint import CheckpointManager, TrainState
from train.config import load_config
from train.dataset import bench_batches, bench_model_config
from train.device import autocast_ctx, resolve_dtype
from train.errors import TrainError
from train.guard import SpikeGuard
from train.loop import train_step
from train.optim import build_optimizer
from train.parallel.build import make_strategy
from train.strategy import StrategySpec


def build(cfg):
    """(strategy, batches, amp, model config) of cfg's model on the CPU, parallel.strategy=none."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    dtype = resolve_dtype(device) if cfg.train.dtype == "auto" else cfg.train.dtype
    mcfg = bench_model_config(cfg)
    batches = bench_batches(cfg, mcfg.vocab_size, device)
    spec = StrategySpec(precision=short(dtype), grad_accum_steps=len(batches), grad_clip=cfg.optim.grad_clip)
    strategy = make_strategy("none", device, spec)
    strategy.wrap(GPT(mcfg), lambda m: build_optimizer(m, cfg.optim))
    return strategy, batches, autocast_ctx(device, dtype), mcfg


def measure(strategy, batches, amp, ckpts: CheckpointManager | None, every: int, cycles: int) -> tuple[float, float]:
    """(median ms of a step, mean ms that one save() call holds the loop) over cycles x every steps with
    a save after each `every`. Medians and per-call times, not a loop's total: a shared machine's bursts
    of load would swamp a difference of totals."""
    steps, saves = [], []
    for c in range(cycles):
        for _ in range(every):
            t0 = time.perf_counter()
            loss, _ = train_step(strategy, batches, amp)
            loss.item()
            steps.append(time.perf_counter() - t0)
        if ckpts is not None:
            t0 = time.perf_counter()  # async: includes waiting for the previous save, if still in flight
            ckpts.save(TrainState(step=(c + 1) * every, model_config=ckpts.model_config.to_dict()), with_model=True)
            saves.append(time.perf_counter() - t0)
    if ckpts is not None:
        ckpts.wait()
    return 1000 * statistics.median(steps), 1000 * statistics.mean(saves) if saves else 0.0


def guard_step_ms(strategy, batches, amp, cfg, steps: int) -> tuple[float, float]:
    """Median ms per step without and with the guard's gate."""
    guard = SpikeGuard(cfg.guard)
    out = []
    for gate in (None, lambda loss, norm: guard.admit(strategy, 0, loss, norm)):
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            train_step(strategy, batches, amp, gate=gate)
            times.append(time.perf_counter() - t0)
        out.append(1000 * statistics.median(times))
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.bench_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/debug.yaml", help="a run file (default: the CPU demo's)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    ap.add_argument("--every", type=int, default=10, help="steps between checkpoints (default 10)")
    ap.add_argument("--cycles", type=int, default=3, help="checkpoints per loop (default 3)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.every < 1 or args.cycles < 1:
        raise TrainError("--every and --cycles must be >= 1")
    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    strategy, batches, amp, mcfg = build(cfg)
    print(
        f"model: {mcfg.family}, {mcfg.n_layer} layers, {mcfg.n_embd} wide, context {cfg.seq_len} | "
        f"{cfg.train.tokens_per_step:,} tokens/step | cpu, {torch.get_num_threads()} threads | "
        f"torch {torch.__version__}"
    )
    print(describe_cpu(), flush=True)
    measure(strategy, batches, amp, None, 3, 1)  # warm-up: the allocator and the optimizer's state
    steps = args.every * args.cycles
    plain, _ = measure(strategy, batches, amp, None, args.every, args.cycles)
    print(f"{steps} steps, a checkpoint every {args.every}: step {plain:.1f} ms without checkpoints", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, asynchronous in (("blocking", False), ("async", True)):
            ckpts = CheckpointManager(f"{tmp}/{name}", strategy, mcfg, keep_last=2, asynchronous=asynchronous)
            ckpts.root.mkdir(parents=True)
            step_ms, save_ms = measure(strategy, batches, amp, ckpts, args.every, args.cycles)
            size = sum(f.stat().st_size for f in ckpts.latest().rglob("*") if f.is_file())
            print(
                f"  {name:<8} the loop waits {save_ms:7.1f} ms per checkpoint ({size / 2**20:.1f} MiB); "
                f"step {step_ms:.1f} ms (median)",
                flush=True,
            )
    without, with_guard = guard_step_ms(strategy, batches, amp, cfg, steps)
    print(f"guard: step {without:.1f} ms without, {with_guard:.1f} ms with its decision (median of {steps})")
    strategy.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
