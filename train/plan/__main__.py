"""`python -m train.plan`: the planner's command line (the planner itself: train/plan/__init__.py).

python -m train.plan --config configs/gpt2-124m.yaml --gpus 8 --gpu h100-sxm
python -m train.plan --config configs/gpt2-350m.yaml --gpus 16 --nodes 2 --gpu a100-80g train.micro_batch=8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from train.config import load_config
from train.fp8 import peak_dtype as peak_dtype_of
from train.hardware import BY_KEY, NETWORK_GBPS, peak_tflops
from train.plan import (
    EFFICIENCY,
    HEADROOM,
    Hardware,
    PlanError,
    command,
    detail,
    plan,
    run_dtype,
    table,
)


def parse_hardware(args) -> Hardware:
    gpu = BY_KEY.get(args.gpu)
    if gpu is None:
        raise PlanError(f"--gpu {args.gpu!r}: choose one of {', '.join(BY_KEY)}")
    if args.gpus < 1 or args.nodes < 1 or args.gpus % args.nodes:
        raise PlanError(f"--gpus ({args.gpus}) must be a positive multiple of --nodes ({args.nodes})")
    for flag in ("intra_bw", "inter_bw", "memory_gib"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise PlanError(f"--{flag.replace('_', '-')} must be > 0")
    if not 0 < args.efficiency <= 1:
        raise PlanError(f"--efficiency must be in (0, 1]; got {args.efficiency}")
    if peak_tflops(gpu, "bfloat16") is None:
        raise PlanError(f"--gpu {args.gpu} has no dense tensor peak in train/hardware.py")
    if args.memory_gib is not None:
        gpu = dataclasses.replace(gpu, memory_gib=args.memory_gib)
    return Hardware(
        gpu,
        args.gpus // args.nodes,
        args.nodes,
        args.intra_bw if args.intra_bw is not None else gpu.link_gbps,
        args.inter_bw if args.inter_bw is not None else NETWORK_GBPS,
        args.efficiency,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m train.plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="a run file, e.g. configs/gpt2-124m.yaml")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in all (default 8)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes they are spread over (default 1)")
    ap.add_argument("--gpu", default="h100-sxm", help=f"one of {', '.join(BY_KEY)} (default h100-sxm)")
    ap.add_argument("--memory-gib", type=float, help="GPU memory in GiB (default: the table's)")
    ap.add_argument("--intra-bw", type=float, help="GB/s per GPU and direction inside a node (default: the table's)")
    ap.add_argument(
        "--inter-bw", type=float, help=f"GB/s per GPU and direction between nodes (default {NETWORK_GBPS:g})"
    )
    ap.add_argument(
        "--efficiency",
        type=float,
        default=EFFICIENCY,
        help=f"share of the peak the matmuls reach (default {EFFICIENCY})",
    )
    ap.add_argument("--top", type=int, default=12, help="rows of the table (default 12)")
    args = ap.parse_args(argv)
    hw = parse_hardware(args)
    if not Path(args.config).is_file():
        raise PlanError(f"--config {args.config}: no such file")
    cfg = load_config(args.config, args.overrides)  # ConfigError is a UserError: one line, exit 2
    peak_dtype = "float8" if peak_dtype_of(cfg.train) == "float8" else run_dtype(cfg)  # estimate()'s rule
    peak = peak_tflops(hw.gpu, peak_dtype)
    if peak is None:
        raise PlanError(f"--gpu {args.gpu} has no fp8 tensor cores, which train.fp8 needs: choose another --gpu")
    ests = plan(cfg, hw)
    m = cfg.model
    fp8 = cfg.train.fp8
    # train/footprint.py: fp8's activations traced on the converted model, its float8 FSDP all-gather
    precision = run_dtype(cfg) + (f" + fp8 {fp8} Linear layers (activations, all-gathers)" if fp8 != "none" else "")
    print(
        f"model: {m.family}, {m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads ({m.n_kv_head} kv), "
        f"context {cfg.seq_len} | {cfg.train.tokens_per_step:,} tokens/step | {precision} | "
        f"optimizer {cfg.optim.name}"
    )
    print(
        f"hardware: {hw.world} x {hw.gpu.name} ({hw.gpu.memory_gib:g} GiB, {peak:g} dense "
        f"TFLOP/s {peak_dtype}: {hw.gpu.source}) | {hw.gpus_per_node} per node over {hw.intra_gbps:g} GB/s, "
        f"{hw.nodes} node(s), {hw.inter_gbps:g} GB/s network | compute at {hw.efficiency:.0%} of peak\n"
    )
    print(table(ests, hw, args.top))
    fitting = [e for e in ests if e.fits]
    print(f"\n{len(fitting)} of {len(ests)} candidate layouts fit in {HEADROOM:.0%} of {hw.gpu.memory_gib:g} GiB")
    if not fitting:
        smallest = min(ests, key=lambda e: e.footprint.total)
        print("nothing fits; the smallest footprint:\n" + detail(smallest, hw))
        print("try more GPUs (--gpus), a larger GPU (--gpu) or a smaller train.micro_batch / model")
        return
    best = fitting[0]
    print("\nrecommended (the fastest that fits):\n" + detail(best, hw))
    print(f"\n  {command(args.config, args.overrides, cfg, best, hw)}")


def cli(argv: list[str] | None = None) -> int:
    from eval.cli import run

    return run(main, argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(cli())
