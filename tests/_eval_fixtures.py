"""Shared by the eval / quantize / onnx tests: a small dataset and a briefly trained byte-level model.

Trained here with a plain AdamW loop (not train/, which these tests must not depend on), so that
accuracy checks (int8 loss, argmax agreement) run on a model with real structure, not noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import GPT, ModelConfig
from model.io import save_artifact

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=257, block_size=64, n_layer=2, n_head=4, n_embd=64)


def prepare_bytes_dataset(out: Path) -> Path:
    from data.prepare import prepare

    prepare(out, source="pydoc", tokenizer="bytes", val_tokens=20_000, progress=False)
    return out


def train_tiny(data_dir: Path, out: Path, steps: int = 200, seed: int = 0, **cfg_overrides) -> Path:
    """A model artifact (tokenizer bytes) trained `steps` AdamW steps on random train windows."""
    from data.shards import open_split

    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **cfg_overrides})
    model = GPT(cfg)
    stream = open_split(data_dir, "train")
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    T, B = cfg.block_size, 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP barriers on a shared CPU (20x here)
    try:
        _loop(model, opt, stream, rng, T, B, steps)
    finally:
        torch.set_num_threads(threads)
    return save_artifact(out, model.eval(), cfg, {"tokenizer": "bytes", "step": steps})


def _loop(model, opt, stream, rng, T: int, B: int, steps: int) -> None:
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - T - 1, size=B)
        w = torch.from_numpy(np.stack([stream.read(int(s), T + 1) for s in starts]).astype(np.int64))
        loss = model(w[:, :-1], w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def shared_trained(tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, dataset) built once per pytest run, for every module and xdist worker that asks."""
    from conftest import build_once, run_root

    root = run_root(tmp_path_factory) / "eval-shared"
    data = build_once(root, "pydoc-bytes", prepare_bytes_dataset)
    art = build_once(root, "tiny-trained", lambda out: train_tiny(data, out, steps=400))
    return art, data


def tiny_random(out: Path, family: str = "gpt2", seed: int = 0, **kw) -> Path:
    """An untrained artifact (tokenizer bytes): enough where only plumbing is tested."""
    torch.manual_seed(seed)
    base = dict(TINY)
    if family == "modern":
        base.update(family="modern", n_kv_head=2, bias=False, tie_embeddings=False)
    cfg = ModelConfig(**{**base, **kw})
    return save_artifact(out, GPT(cfg).eval(), cfg, {"tokenizer": "bytes"})
