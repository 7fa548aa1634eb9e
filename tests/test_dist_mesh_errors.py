"""Layouts that cannot run are one line each, before any process group or model work: the degrees
against the world size, what tensor / context / pipeline parallel ask of the model, DeepSpeed with a
mesh dimension; through the real `python -m train`, exit code 2 and no traceback."""

from __future__ import annotations

import pytest
from train_helpers import DEBUG_YAML, prepared_dataset, run_cli, tiny_overrides

from model.config import ModelConfig
from train.config import load_config
from train.errors import ConfigError
from train.parallel.dims import MeshError, ParallelDims, check_model


@pytest.mark.parametrize(
    "degrees, world, message",
    [
        (dict(tp=3), 4, r"multiply to 3 \(tp=3\) but 4 process\(es\) run"),
        (dict(dp_shard=2, tp=2), 8, r"multiply to 4 \(dp_shard=2 x tp=2\) but 8"),
        (dict(dp_shard=-1, tp=3), 4, r"world size 4 is not a multiple of 3 \(tp=3\)"),
        (dict(dp_shard=-1, tp=-1), 4, "only one degree may be -1"),
        (dict(cp=0), 1, r"parallel.cp=0: each degree is a positive integer"),
    ],
)
def test_degrees_must_make_the_world(degrees, world, message):
    with pytest.raises(MeshError, match=message):
        ParallelDims(world_size=world, **degrees)


def test_minus_one_takes_the_rest_and_coordinates_are_row_major():
    dims = ParallelDims(dp_replicate=2, dp_shard=-1, tp=2, world_size=8, rank=5)
    assert dims.dp_shard == 2 and dims.dp_size == 4
    # rank 5 = ((0 * 2 + 1) * 2 + 0) * 1 * 2 + 1: replica 1, shard 0, tp rank 1
    assert dims.coords() == {"pp": 0, "dp_replicate": 1, "dp_shard": 0, "cp": 0, "tp": 1}
    assert (dims.dp_rank, dims.tp_rank) == (2, 1)
    assert ParallelDims.from_options("fsdp", {"tp": 2}, 8).dp_shard == 4  # the shorthand takes the rest


MODERN = dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, family="modern")


@pytest.mark.parametrize(
    "model, degrees, seq_len, message",
    [
        (dict(n_head=6, n_kv_head=6, n_embd=48), dict(tp=4), 64, r"parallel.tp=4 must divide model.n_head = 6"),
        ({}, dict(tp=4), 64, r"parallel.tp=4 must divide model.n_kv_head = 2"),
        (dict(ffn_hidden=100), dict(tp=8, n_head=8), 64, r"must divide the MLP width .* = 100"),
        (dict(vocab_size=97), dict(tp=2), 64, r"parallel.tp=2 must divide model.vocab_size \(padded\) = 97"),
        ({}, dict(cp=4), 36, r"data.seq_len=36 must be divisible by 2 x parallel.cp = 8"),
        ({}, dict(pp=4), 64, r"model.n_layer=2 is fewer than the 4 pipeline stages"),
    ],
)
def test_what_the_degrees_ask_of_the_model(model, degrees, seq_len, message):
    n_head = degrees.pop("n_head", None)
    cfg = ModelConfig(**{**MODERN, **model, **({"n_head": n_head, "n_kv_head": n_head} if n_head else {})})
    dims = ParallelDims(world_size=max(degrees.values()), **degrees)
    with pytest.raises(MeshError, match=message):
        check_model(dims, cfg, seq_len)


def test_deepspeed_refuses_mesh_dimensions():
    with pytest.raises(ConfigError, match=r"deepspeed is data parallel only .* parallel.tp=2"):
        load_config(DEBUG_YAML, ["parallel.strategy=deepspeed", "parallel.tp=2"])


def test_bad_layouts_are_one_line_from_the_cli(tmp_path_factory, tmp_path):
    data = prepared_dataset(tmp_path_factory)
    for extra, message in (
        (["parallel.tp=2"], "config error: the parallel degrees multiply to 2 (tp=2) but 1 process(es) run"),
        (["parallel.tp=3"], "config error: parallel.tp=3 must divide model.n_head = 4"),
    ):
        proc = run_cli(["--config", str(DEBUG_YAML), *tiny_overrides(data, tmp_path / "r", *extra)])
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
