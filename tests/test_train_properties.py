"""Properties of the training step that a loss curve cannot show: the accumulated gradient is the
mean, activation checkpointing really recomputes, bf16 autocast really runs the matmuls in bf16.

Each test observes the property itself (a gradient norm, a count of forward calls, the dtypes the
matmul kernels receive), so that it fails when the feature is silently missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import require_extra
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import REPO, metrics, python_env, tiny_config, train_losses

from model import GPT, ModelConfig
from model.io import load_state
from train.loop import run

PROBE = Path(__file__).with_name("ac_probe.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- accumulation


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in metrics(run_dir) if "grad_norm" in r}


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(data_dir, tmp_path):
    """4 micro-batches of 2 and 1 micro-batch of 8 see the same 8 sequences per step (the loader's
    contract), so the accumulated gradient must be the big batch's gradient. The pre-clip grad norm
    shows it directly: without the division by the accumulation steps it is 4x. (Losses and weights
    after AdamW and clipping could not tell: both cancel a uniform scale of the gradient.)"""
    common = ["train.max_steps=2", "train.tokens_per_step=256", "optim.grad_clip=0.5"]
    accum, big = tmp_path / "accum", tmp_path / "big"
    run(tiny_config(data_dir, accum, *common, "train.micro_batch=2"), log=lambda m: None)
    run(tiny_config(data_dir, big, *common, "train.micro_batch=8"), log=lambda m: None)
    na, nb = grad_norms(accum), grad_norms(big)
    assert sorted(na) == sorted(nb) == [1, 2]
    for step in na:
        # fp32, dropout 0: only the summation order differs
        assert na[step] == pytest.approx(nb[step], rel=1e-5), (step, na[step], nb[step])
    la, lb = train_losses(accum), train_losses(big)
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=1e-5, rel=0)
    _, sa, _ = load_state(accum)
    _, sb, _ = load_state(big)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- activation checkpointing


class CallCounter:
    """Counts forward calls of every block's MLP: a block's forward under checkpointing runs once in
    the forward pass and once more when backward recomputes it."""

    def __init__(self):
        self.calls: Counter = Counter()
        self._handle = None

    def __enter__(self):
        from model.gpt import MLP

        def hook(module, args):
            if isinstance(module, MLP):
                self.calls[id(module)] += 1

        # A global hook sees the modules inside run(), which the test never gets hold of. A pre-hook:
        # the recomputation stops as soon as it has every saved tensor back (checkpoint's early stop),
        # which is inside the MLP, so a post-forward hook would not run the second time.
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def test_activation_checkpointing_recomputes_through_the_strategy():
    """make_strategy(...).wrap with activation_checkpointing=True: each block runs twice per
    forward+backward (the recomputation), once without."""
    from train.parallel.build import make_strategy
    from train.strategy import StrategySpec

    counts = {}
    for ac in (False, True):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
        spec = StrategySpec(precision="fp32", grad_accum_steps=1, grad_clip=0.0, activation_checkpointing=ac)
        strategy = make_strategy("none", torch.device("cpu"), spec)
        wrapped, _ = strategy.wrap(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
        x = torch.randint(0, 64, (2, 16))
        with CallCounter() as counter:
            wrapped(x, x).backward()
        counts[ac] = sorted(counter.calls.values())
        strategy.teardown()
    assert counts == {False: [1, 1], True: [2, 2]}


def test_activation_checkpointing_in_the_loop_recomputes_and_keeps_the_losses(data_dir, tmp_path):
    """Through run(cfg): twice the block calls, and the same losses with dropout on, since the
    recomputation replays the dropout masks (preserve_rng_state)."""
    common = ["train.max_steps=3", "model.dropout=0.1"]
    calls = {}
    for name, extra in (("plain", []), ("ac", ["train.activation_checkpointing=true"])):
        with CallCounter() as counter:
            run(tiny_config(data_dir, tmp_path / name, *common, *extra), log=lambda m: None)
        calls[name] = sum(counter.calls.values())
    # 2 layers x 2 micro-batches x 3 steps forward calls; checkpointing adds as many recomputations
    assert calls == {"plain": 12, "ac": 24}
    assert train_losses(tmp_path / "plain") == train_losses(tmp_path / "ac")
    _, sd, _ = load_state(tmp_path / "ac")
    assert not any("checkpoint" in k for k in sd)  # parameter names unchanged


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_activation_checkpointing_is_applied_under_sharding(strategy, tmp_path):
    """The same count on 2 gloo ranks, for the strategies that apply AC before sharding."""
    if strategy == "deepspeed":
        require_extra("deepspeed", "deepspeed")
    env = {**python_env(), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(PROBE), strategy, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for rank in (0, 1):
        calls = json.loads((tmp_path / f"calls_rank{rank}.json").read_text())
        assert calls == {"False": [1, 1], "True": [2, 2]}, (rank, calls)


# ----------------------------------------------------------------------------- bf16 autocast

MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the floating-point inputs of every matmul kernel that runs."""

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._opname in MATMULS:
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    self.seen[a.dtype] += 1
        return func(*args, **(kwargs or {}))


def test_bfloat16_autocast_runs_the_matmuls_in_bf16(data_dir, tmp_path):
    """One training step with train.dtype=bfloat16: every matmul of forward and backward gets bf16
    inputs, while the weights stay fp32 (autocast casts per op, the master copy is fp32)."""
    run_dir = tmp_path / "bf16"
    # the smallest step: this CPU may emulate bf16, and the dispatch mode sees every op
    cfg = tiny_config(
        data_dir,
        run_dir,
        "train.dtype=bfloat16",
        "train.max_steps=1",
        "model.n_embd=32",
        "train.tokens_per_step=64",
        "train.micro_batch=2",
    )
    with MatmulDtypes() as mode:
        run(cfg, log=lambda m: None)
    assert mode.seen[torch.bfloat16] > 0
    assert set(mode.seen) == {torch.bfloat16}, dict(mode.seen)
    assert math.isfinite(train_losses(run_dir)[1])
    _, sd, _ = load_state(run_dir)
    assert all(v.dtype == torch.float32 for v in sd.values())
