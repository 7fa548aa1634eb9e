"""Shared by tests/test_train_*.py: one prepared dataset per session and tiny-run configs.

Tiny means 2 layers, 64 wide, 32-token context, 256 tokens per step (2 micro-batches of 4): a step
takes milliseconds on one CPU core, so a test can afford tens of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG_YAML = REPO / "configs" / "debug.yaml"

TINY = [
    "model.family=gpt2",
    "model.bias=true",
    "model.tie_embeddings=true",  # debug.yaml's is modern
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=64",
    "model.block_size=32",
    "model.dropout=0.0",
    "train.tokens_per_step=256",
    "train.micro_batch=4",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.device=cpu",
    "train.dtype=float32",
    "train.compile=false",
    "schedule.warmup_steps=2",
    "optim.lr=3e-3",
    "checkpoint.every=0",
    "checkpoint.keep_last=0",
    "checkpoint.keep_best=false",
    "logging.log_every=1",
    "logging.sample_every=0",
    "logging.progress_bar=false",
]


def one_thread():
    """Generator for a module-scoped fixture: tiny models run on one intra-op thread. On a shared
    2-core machine, OpenMP threads spinning against other processes make a tiny step ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prepared_dataset(tmp_path_factory) -> Path:
    """The embedded pydoc corpus with the bytes tokenizer, prepared once per test run, for every xdist
    worker (conftest.build_once)."""
    from conftest import build_once, run_root

    from data.prepare import prepare

    build = lambda out: prepare(out, source="pydoc", tokenizer="bytes", progress=False)  # noqa: E731
    return build_once(run_root(tmp_path_factory) / "train-data", "pydoc-bytes", build)


def tiny_overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.dir={data_dir}", f"train.run_dir={run_dir}", *extra]


def tiny_config(data_dir: Path, run_dir: Path, *extra: str):
    from train.config import load_config

    return load_config(DEBUG_YAML, tiny_overrides(data_dir, run_dir, *extra))


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metrics(run_dir) if "val_loss" in r}


def python_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as one_thread() in the test process
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_cli(args: list[str], cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m train ARGS` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=cwd,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
