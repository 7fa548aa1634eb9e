"""What a run reports: peak FLOPs of the device (for MFU), peak memory, and the sinks
(console line, metrics.jsonl, TensorBoard, W&B).

MFU (model FLOPs utilisation, Chowdhery et al. 2022, PaLM appendix B) = achieved model FLOPs/s over
the device's peak. The peak comes from train/hardware.py's table of dense tensor-core figures (vendor
datasheets, the "with sparsity" numbers halved) matched on the CUDA device name; on the CPU, and on a
GPU the table does not know, it is measured with a short matmul at start-up in the dtype the run uses.
The run's log names the peak and where it came from. The model FLOPs are GPT.flops_per_token's
(model/gpt.py: its conventions are there and in docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from model.files import write_text_atomic
from train.hardware import find_gpu, peak_tflops


def gpu_table_peak(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a GPU in train/hardware.py's table for the run's dtype, or None."""
    gpu = find_gpu(name)
    tflops = peak_tflops(gpu, dtype) if gpu is not None else None
    return None if tflops is None else tflops * 1e12


@functools.cache
def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of the best of repeated n x n matmuls (2 n^3 FLOPs each): a practical peak for devices
    without a table entry (a CPU's depends on its cores, vector units and BLAS). Measured once per
    process and (device, dtype)."""
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: the training RNG stays put
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    mm = lambda: a @ b  # noqa: E731
    if dtype == torch.float8_e4m3fn:  # fp8 tensor cores through torch._scaled_mm (b column-major, unit scales)
        b, one = b.t().contiguous().t(), torch.ones((), device=device)
        mm = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    mm()  # warm-up: thread pool, kernel selection
    sync()
    first = time.perf_counter() - t0
    if first > 0.1:  # an emulated dtype (bf16 on a CPU without bf16 units): one more sample is enough
        return 2 * n**3 / first
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        mm()
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def device_peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device for `dtype`, where the number comes from). dtype "float8": the fp8
    tensor-core peak of an fp8 run (train/fp8.py), measured with torch._scaled_mm off the table."""
    tdtype = torch.float8_e4m3fn if dtype == "float8" else getattr(torch, dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_table_peak(name, dtype)
        if peak is not None:
            gpu = find_gpu(name)
            return peak, f"{gpu.name} datasheet, dense {dtype}: {gpu.source}"
        return measure_matmul_peak(device, tdtype, n=4096), f"{name} measured {dtype} matmul (not in train/hardware.py)"
    threads = torch.get_num_threads()
    peak, what = measure_matmul_peak(device, tdtype), dtype
    if dtype != "float32":
        # A CPU without bf16 units emulates bf16 matmuls far below its fp32 rate; the device's real peak
        # is then the fp32 one, so that MFU is never flattered by a slow dtype.
        fp32 = measure_matmul_peak(device, torch.float32)
        if fp32 > peak:
            peak, what = fp32, "float32 (faster than bf16 here)"
    return peak, f"{device.type} measured {what} matmul, {threads} threads"


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def format_line(r: dict, max_steps: int) -> str:
    width = len(str(max_steps))
    return (
        f"step {r['step']:>{width}}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
        f"norm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | mfu {100 * r['mfu']:.1f}% | "
        f"{r['ms_per_step']:.0f} ms/step | mem {r['peak_mem_gb']:.2f} GB"
    )


class MetricsWriter:
    """metrics.jsonl (always), TensorBoard and W&B (when enabled and installed). Main rank only."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "gptrain",
        wandb_run_name: str | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                print(
                    "logging.tensorboard: the tensorboard package is not installed; skipping (pip install tensorboard)",
                    file=sys.stderr,
                )
        if wandb:
            try:
                import wandb as wb

                self.wandb = wb.init(
                    project=wandb_project, name=wandb_run_name, config=config, dir=str(run_dir), resume="allow"
                )
            except ImportError:
                print(
                    "logging.wandb: the wandb package is not installed; skipping (pip install wandb)", file=sys.stderr
                )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        scalars = {
            k: v
            for k, v in record.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and k not in ("step", "time")
            and math.isfinite(v)
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """On resume from step N, drop records of steps > N (they belong to the lost part of the run),
    so that metrics.jsonl reads as one run."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))
