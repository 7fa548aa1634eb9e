"""python -m eval.bench_startup: start-up of a one-token sample, eval.sample beside a nanoGPT-style script.

    python -m eval.bench_startup                          # a demo-size random artifact (4 x 256, bytes)
    python -m eval.bench_startup --ckpt runs/debug --rounds 5

Each round starts two fresh processes, one after the other: `python -m eval.sample --ckpt ART
--prompt ab --max-new-tokens 1 --temperature 0`, and a script shaped like nanoGPT's sample.py
(import torch and tiktoken, build the GPT with its init, load the weights, one greedy token, print
it). Alternating them spreads a busy spell of a shared CPU over both. Prints the fastest and the
median wall seconds of each and their ratio. This prints numbers; no test times anything.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data.machine import describe_cpu
from eval.cli import UsageError, run

# nanoGPT's sample.py, reduced to what a one-token sample does, on this repository's artifact.
NANOGPT = """
import json, sys
import tiktoken  # noqa: F401  (nanoGPT's sample.py imports it)
import torch
from safetensors.torch import load_file
from model.config import ModelConfig
from model.gpt import GPT
art = sys.argv[1]
cfg = ModelConfig.from_dict(json.load(open(art + "/model.json"))["config"])
model = GPT(cfg)
model.load_weights(load_file(art + "/model.safetensors"))
model.eval()
with torch.no_grad():
    logits = model(torch.tensor([list(b"ab")]))[:, -1]
print(bytes([min(int(logits.argmax()), 255)]).decode(errors="replace"))
"""


def demo_artifact(out: Path) -> Path:
    """A random demo-size model (eval.bench's demo, 256 context) written as an artifact."""
    import torch

    from eval.bench import DEMO
    from model import GPT, ModelConfig
    from model.io import save_artifact

    torch.manual_seed(0)
    cfg = ModelConfig(**{**DEMO, "block_size": 256})
    save_artifact(out, GPT(cfg), cfg, {"tokenizer": "bytes"})
    return out


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"{' '.join(cmd[:4])} ... failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m eval.bench_startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", help="model artifact (a float one, with model.json and model.safetensors)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        if args.ckpt:
            from model.io import resolve

            art = resolve(args.ckpt)
        else:
            art = demo_artifact(tmp / "demo")
        ours = [sys.executable, "-m", "eval.sample", "--ckpt", str(art), "--prompt", "ab"]
        ours += ["--max-new-tokens", "1", "--temperature", "0"]
        theirs = [sys.executable, "-c", NANOGPT, str(art)]
        times: dict[str, list[float]] = {"eval.sample": [], "nanoGPT-style": []}
        for _ in range(args.rounds):
            times["eval.sample"].append(wall(ours))
            times["nanoGPT-style"].append(wall(theirs))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# one-token sample start-up, {args.rounds} rounds, {art}\n# {describe_cpu()}")
    for name, ts in times.items():
        print(f"  {name:<14} fastest {min(ts):6.2f} s   median {statistics.median(ts):6.2f} s")
    ratio = statistics.median(times["eval.sample"]) / statistics.median(times["nanoGPT-style"])
    print(f"  eval.sample / nanoGPT-style (medians): {ratio:.2f}x (goal <= 1x)")


if __name__ == "__main__":
    sys.exit(run(main))
