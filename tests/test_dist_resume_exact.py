"""docs/checkpoints.md's promise for distributed runs: a 2-rank run stopped and resumed on 2 ranks is the
uninterrupted 2-rank run bit for bit, with dropout on. Each rank draws its own dropout masks
(train.seed + rank), so the resume must give each rank back its own RNG state, not rank 0's."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file
from train_helpers import DEBUG_YAML, REPO, prepared_dataset, python_env, tiny_overrides, train_losses

pytestmark = pytest.mark.slow


def torchrun2(data, run_dir, *extra: str) -> None:
    args = tiny_overrides(data, run_dir, "model.dropout=0.2", "checkpoint.every=2", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    p = subprocess.run(
        [*cmd, "--config", str(DEBUG_YAML), *args],
        cwd=REPO,
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


@pytest.mark.parametrize("strategy", ["ddp"])  # three 2-rank launches each; FSDP's resume is in test_dist_*
def test_two_rank_resume_is_the_uninterrupted_run_bit_for_bit(tmp_path_factory, tmp_path, strategy):
    data = prepared_dataset(tmp_path_factory)
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun2(data, straight, f"parallel.strategy={strategy}", "train.max_steps=4")
    torchrun2(data, split, f"parallel.strategy={strategy}", "train.max_steps=2")
    torchrun2(data, split, f"parallel.strategy={strategy}", "train.max_steps=4")  # resume: auto
    want, got = train_losses(straight), train_losses(split)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert got == want  # exactly: same batches, same dropout masks on each rank, same reductions
    a = load_file(straight / "checkpoints" / "step_000004" / "model" / "model.safetensors")
    b = load_file(split / "checkpoints" / "step_000004" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
