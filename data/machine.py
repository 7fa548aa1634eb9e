"""The machine a benchmark ran on, in one line: every benchmark prints it (docs/benchmarks.md), since
CPUs differ in what is fast on them (bf16 units or not).

It lives in data/ because data/ is the lowest package that the benchmarks of all three (data.bench,
train.bench and train.race, eval.bench and eval.serve.bench) may import: model/ is the network alone,
and data/ imports nothing but model/."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_cpu() -> str:
    """The CPU a benchmark ran on, and whether it has bf16 matrix units (AVX512-BF16 / AMX): which
    precision is fast there (docs/benchmarks.md). From /proc/cpuinfo on Linux, platform elsewhere."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    bf16 = "yes" if "avx512_bf16" in flags or "amx_bf16" in flags else ("no" if flags else "unknown")
    return f"CPU {name} ({os.cpu_count()} cores), avx512_bf16/amx: {bf16}"
