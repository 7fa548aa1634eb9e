"""A 2-D mesh through the real entry point: docs/distributed.md's `bash launch.sh --nproc 4 ...
parallel.dp_shard=2 parallel.tp=2` (taken from the document, tiny overrides appended) runs `python -m train`
under torchrun (fully_shard over dp_shard composed with tensor, sequence and loss parallel), and its
losses, HellaSwag counts and the log's text samples are those of one process on the same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
from docs_helpers import documented, run_documented
from train_helpers import DEBUG_YAML, REPO, metrics, prepared_dataset, run_cli, tiny_overrides, train_losses

pytestmark = pytest.mark.slow

LOSS_TOL = 1e-5  # fp32, dropout 0: only the reduction order differs
# 258 = the bytes vocabulary (257) rounded up to a multiple of tp: the head splits evenly (loss parallel);
# HellaSwag at step 0 and the last: the ranks of one tp group score the same examples together
HELLASWAG = REPO / "tests" / "fixtures" / "hellaswag_mini.jsonl"
DOC_COMMAND = (
    "bash launch.sh --nproc 4 configs/debug.yaml parallel.dp_shard=2 parallel.tp=2 model.vocab_size=258 "
    "train.run_dir=runs/mesh"
)
MODEL = ["model.vocab_size=258", "train.max_steps=3", "eval.hellaswag_every=3", f"eval.hellaswag_data={HELLASWAG}"]
# a sample at the last step, drawn at the default temperature and top-k from the run's seed
MODEL += ["logging.sample_every=3", "logging.sample_tokens=20"]


def test_dp_shard2_x_tp2_through_launch_sh_equals_one_process(tmp_path_factory, tmp_path):
    data = prepared_dataset(tmp_path_factory)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "mesh"
    ref = run_cli(["--config", str(DEBUG_YAML), *tiny_overrides(data, ref_dir, *MODEL)])
    assert ref.returncode == 0, ref.stderr[-3000:]

    shown = documented(DOC_COMMAND)
    assert {"--nproc", "4", "parallel.dp_shard=2", "parallel.tp=2", "model.vocab_size=258"} <= set(shown)
    proc = run_documented(DOC_COMMAND, tiny_overrides(data, run_dir, *MODEL))
    log = proc.stdout + proc.stderr
    assert "adding parallel.strategy=ddp" not in log  # the degrees are the layout, passed through unchanged
    assert "mesh pp 1 x dp_replicate 1 x dp_shard 2 x cp 1 x tp 2 | rank 0 at (pp 0, dp_replicate 0, dp_shard 0" in log
    mesh = next(r["mesh"] for r in metrics(run_dir) if "mesh" in r)
    assert (mesh["world_size"], mesh["dp_shard"], mesh["tp"], mesh["strategy"]) == (4, 2, 2, "mesh")

    def hellaswag(run: Path) -> dict:
        return {r["step"]: (r["hellaswag_n"], r["hellaswag_acc"]) for r in metrics(run) if "hellaswag_n" in r}

    assert hellaswag(run_dir) == hellaswag(ref_dir) and sorted(hellaswag(ref_dir)) == [0, 3]

    def samples(run: Path) -> dict:
        return {r["step"]: r["sample"] for r in metrics(run) if "sample" in r}

    # under tp every step decodes the whole window (sequence parallel splits positions over the tp ranks)
    assert samples(run_dir) == samples(ref_dir) and sorted(samples(ref_dir)) == [3]
    want, got = train_losses(ref_dir), train_losses(run_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert abs(got[step] - want[step]) < LOSS_TOL, (step, got[step], want[step])
