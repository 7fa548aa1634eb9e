"""`python -m train.bench`: training throughput of the real step (train.loop.train_step) under the
speed levers -- bf16 autocast, fused AdamW, torch.compile -- against a plain fp32 eager loop.

    python -m train.bench                                   # the reference: 4 layers, 256 wide, context 256,
                                                            # batch 8, bytes vocabulary (257)
    python -m train.bench --config configs/gpt2-124m.yaml   # a config's model and batch
    python -m train.bench --settings baseline,compile --steps 20 model.n_layer=6

Prints ms/step (the median of the measured steps, after warm-up steps that absorb compilation and
allocator growth), tokens/s and MFU (against the measured or datasheet peak of the device for the
setting's dtype, see train/metrics.py), and the speed-up over the baseline. Batches are random
tokens: throughput does not depend on their values, and no dataset is needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.machine import describe_cpu
from model import GPT, ModelConfig
from model.cli import run
from model.dtypes import short
from train.config import Config, OptimSection, load_config
from train.dataset import bench_batches, bench_model_config, vocab_size
from train.device import autocast_ctx, pick_device
from train.errors import TrainError
from train.loop import train_step
from train.metrics import device_peak_flops
from train.optim import build_optimizer
from train.parallel.build import make_strategy
from train.strategy import StrategySpec

# The reference setting of docs/benchmarks.md's table.
REFERENCE = [
    "model.n_layer=4",
    "model.n_head=4",
    "model.n_embd=256",
    "model.block_size=256",
    "model.vocab_size=257",
    "model.dropout=0.0",
    "train.micro_batch=8",
    "train.tokens_per_step=2048",
]


@dataclass(frozen=True)
class Setting:
    name: str
    dtype: str
    fused: bool
    compile: bool
    fp8: str = "none"  # train.fp8's recipe (train/fp8.py): CUDA with fp8 tensor cores only


SETTINGS = {
    "baseline": Setting("fp32 eager, for-loop AdamW (baseline)", "float32", False, False),
    "fused": Setting("fp32 eager, fused AdamW", "float32", True, False),
    "bf16": Setting("bf16 autocast, fused AdamW", "bfloat16", True, False),
    "compile": Setting("fp32 compile, fused AdamW", "float32", True, True),
    "bf16-compile": Setting("bf16 autocast + compile, fused AdamW", "bfloat16", True, True),
    "fp8-compile": Setting("fp8 tensorwise + bf16 + compile, fused", "bfloat16", True, True, "tensorwise"),
}
DEFAULT = [n for n, s in SETTINGS.items() if s.fp8 == "none"]  # fp8 needs fp8 tensor cores: asked for by name


def measure(cfg: Config, setting: Setting, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per optimizer step of `setting` on cfg's model and batch."""
    torch.manual_seed(0)
    mcfg = bench_model_config(cfg)
    model = GPT(mcfg)
    if setting.fp8 != "none":  # before the layout's transforms, as the loop does
        from train import fp8

        fp8.check_device(device, emulate=False)
        fp8.convert(model, setting.fp8, emulate=False, fsdp=False)
    batches = bench_batches(cfg, mcfg.vocab_size, device)
    spec = StrategySpec(
        precision=short(setting.dtype),
        grad_accum_steps=len(batches),
        grad_clip=cfg.optim.grad_clip,
        compile=setting.compile,
    )
    strategy = make_strategy("none", device, spec)
    optim_cfg = OptimSection(**{**cfg.optim.__dict__, "fused": setting.fused})
    model, _ = strategy.wrap(model, lambda m: build_optimizer(m, optim_cfg))  # compiles as training does
    amp = autocast_ctx(device, setting.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = train_step(strategy, batches, amp)
        loss.item()  # the sync a real loop makes at a log step
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        elif i == warmup - 1:
            warm_s = time.perf_counter() - t_start
    strategy.teardown()
    sec = statistics.median(times)
    tokens = cfg.train.tokens_per_step / sec
    peak, src = device_peak_flops(device, "float8" if setting.fp8 != "none" else setting.dtype)
    flops = model_for_flops(mcfg).flops_per_token(cfg.seq_len)
    return {
        "ms": 1000 * sec,
        "tokens_per_s": tokens,
        "mfu": flops * tokens / peak,
        "peak": peak,
        "peak_source": src,
        "warmup_s": warm_s if warmup else 0.0,
        # CUDA's allocated peak over the steps (model, optimizer, activations); None on the CPU
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def model_for_flops(mcfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(mcfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m train.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="a run file; default: the benchmarks doc's reference model, bytes vocabulary")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    ap.add_argument("--steps", type=int, default=10, help="measured steps per setting (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first (compilation; default 3)")
    ap.add_argument(
        "--settings",
        default=",".join(DEFAULT),
        help=f"comma-separated, from {', '.join(SETTINGS)} (default: all but fp8)",
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (tests/gpu_check.sh reads it)")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names or args.steps < 1 or args.warmup < 0:
        raise TrainError(
            f"--settings takes {', '.join(SETTINGS)} (got {unknown or names}); --steps >= 1, --warmup >= 0"
        )
    cfg = load_config(args.config, (REFERENCE if args.config is None else []) + args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type != "cuda":
        names = [n for n in names if SETTINGS[n].dtype != "float16"]
    m = cfg.model
    print(
        f"model: {m.family}, {m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads, context {cfg.seq_len}, "
        f"vocab {vocab_size(cfg)} | batch {cfg.train.micro_batch} x {cfg.seq_len} "
        f"({cfg.train.tokens_per_step:,} tokens/step) | device {device} "
        f"({torch.get_num_threads()} threads) | torch {torch.__version__}"
    )
    print(describe_cpu())
    print(f"{args.warmup} warm-up + {args.steps} measured steps per setting; median step time\n")
    header = f"{'setting':<40} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7} {'vs baseline':>12}"
    print(header)
    print("-" * len(header))
    results = {}
    for name in names:
        r = measure(cfg, SETTINGS[name], args.steps, args.warmup, device)
        results[name] = r
        base = results.get("baseline")
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(
            f"{SETTINGS[name].name:<40} {r['ms']:>9.1f} {r['tokens_per_s']:>10,.0f} {100 * r['mfu']:>6.1f}% "
            f"{speed:>12}",
            flush=True,
        )
    print()
    for name, r in results.items():
        mem = "" if r["peak_mem_gib"] is None else f"; peak memory {r['peak_mem_gib']:.2f} GiB"
        print(f"  {name}: peak {r['peak'] / 1e12:.3g} TFLOP/s ({r['peak_source']}); warm-up {r['warmup_s']:.1f} s{mem}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "results": results}, indent=1))
    if "baseline" in results and len(results) > 1:
        best = max((n for n in results if n != "baseline"), key=lambda n: results[n]["tokens_per_s"])
        ratio = results[best]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
        print(f"\nfastest: {SETTINGS[best].name} at {ratio:.2f}x the baseline's tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
