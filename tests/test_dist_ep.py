"""Expert parallelism (train/parallel/expert.py) against the one-process run, on a MoE GPT (4 experts,
top-2, a shared expert, the router z-loss and the aux-loss-free bias on; tests/dist_driver.py's "moe"
family). One torchrun launch of four ranks (CPU, gloo) runs:
    dp_shard 4 x ep 2          two experts per rank, each expert pair held by two ranks (edp 2), and its samples
    dp_shard 2 x tp 2 x ep 2   FSDP and TP on the dense weights, the MoE routing each tp rank's slice
    dp_shard 4 x ep 2, resumed from the first run's checkpoint: the same losses, bit for bit
    dp_shard 4 (ep 1), resumed from the same checkpoint: DCP reshards the experts
and one process resumes from that ep 2 checkpoint as well. Losses and gradient norms equal the
reference within LOSS_TOL at every step; the layout is shown applied (the local experts, the rows
that went through all_to_all) and the routing bias is shown to travel in the checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dist_driver as drv
import pytest
import torch
from train_helpers import DEBUG_YAML, metrics, prepared_dataset, python_env, run_cli, tiny_overrides

from model.config import ModelConfig
from train.config import load_config
from train.errors import ConfigError
from train.parallel.dims import MeshError, ParallelDims, check_model

LOSS_TOL = 1e-5  # fp32: reduction order only
STEPS = 4
SAVE = 2
C, H, E = 64, 32, 4  # dist_driver's moe family: n_embd, expert width, experts
W_UP = "transformer.h.0.mlp.w_up"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Checkpoints in run_ep2/, every run's results in out/."""
    return tmp_path_factory.mktemp("ep")


@pytest.fixture(scope="module")
def ref(work) -> dict:
    (work / "out").mkdir(exist_ok=True)
    sc = {"name": "ref", "strategy": "none", "steps": STEPS, "family": "moe", "sample_at": 3}
    return drv.run_scenario(sc, work / "out")


@pytest.fixture(scope="module")
def four_ranks(work) -> Path:
    out = work / "out"
    ckpt = str(work / "run_ep2" / "checkpoints" / f"step_{SAVE:06d}")
    moe = {"family": "moe", "steps": STEPS}
    spec = {
        "out": str(out),
        "driver_group": True,
        "scenarios": [
            {
                "name": "shard4_ep2",
                "strategy": "fsdp",
                "options": {"ep": 2},
                "record_layout": True,
                "save_at": SAVE,
                "save_dir": str(work / "run_ep2"),
                "save_model": False,
                "sample_at": 3,
                **moe,
            },
            {
                "name": "shard2_tp2_ep2",
                "strategy": "fsdp",
                "options": {"tp": 2, "ep": 2},
                "record_layout": True,
                "sample_at": 3,
                **moe,
            },
            {"name": "shard4_ep2_resumed", "strategy": "fsdp", "options": {"ep": 2}, "load": ckpt, "seed": 5, **moe},
            {"name": "shard4_from_ep2", "strategy": "fsdp", "load": ckpt, "seed": 7, **moe},
        ],
    }
    drv.launch_ok(spec, 4, work, "four")
    return out


def _max_diff(res: dict, ref: dict, steps) -> float:
    for step in steps:
        assert abs(res["norms"][step] - ref["norms"][step]) < LOSS_TOL * max(1.0, ref["norms"][step]), step
    return max(abs(res["losses"][s] - ref["losses"][s]) for s in steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shard4_ep2", "shard2_tp2_ep2"])
def test_ep2_equals_one_process(four_ranks, ref, name):
    """Losses and gradient norms; and the training log's samples after step 3 (greedy and drawn),
    decoded through the layout (every rank routes its copy of the token through the ep group; under
    tp, whole windows) as one process decodes them. (The resumed run below, which draws none, shows
    that drawing them leaves training bit for bit where it was.)"""
    got = drv.load_result(four_ranks, name)
    assert _max_diff(got, ref, range(1, STEPS + 1)) < LOSS_TOL
    assert got["samples"] == ref["samples"] and len(ref["samples"][0]) == 8


@pytest.mark.slow
def test_ep_plan_is_applied(four_ranks):
    """Each rank holds E / ep experts as a DTensor Shard(0) (outside FSDP); the dense weights keep their
    FSDP / TP placements; tokens went through all_to_all (two per MoE block and forward, plus the
    backward's); under tp the MoE routes the rank's slice of the sequence."""
    for name in ("shard4_ep2", "shard2_tp2_ep2"):
        res = drv.load_result(four_ranks, name)
        layout = res["layout"]
        assert layout[W_UP] == {"placements": ["S(0)"], "local": [E // 2, 2 * H, C]}, name
        assert layout["transformer.h.1.mlp.w_down"] == {"placements": ["S(0)"], "local": [E // 2, C, H]}, name
        # every forward of every step: dispatch + combine in each of the 2 MoE blocks, all non-empty
        rows = res["all_to_all_rows"]
        assert len(rows) >= 2 * 2 * STEPS and min(rows) > 0, (name, rows)
    tp = drv.load_result(four_ranks, "shard2_tp2_ep2")["layout"]
    assert len(tp["transformer.h.0.attn.c_attn.weight"]["placements"]) == 2  # FSDP x TP
    assert len(tp["transformer.h.0.mlp.router.weight"]["placements"]) == 1  # FSDP only: replicated over tp
    # one rank's rows x its sequence slice x top-2, per MoE forward
    tokens = drv.GLOBAL_BATCH // 2 * drv.SEQ // 2 * 2
    assert drv.load_result(four_ranks, "shard2_tp2_ep2")["all_to_all_rows"][0] == tokens


@pytest.mark.slow
def test_resume_is_exact_and_reshards_across_ep(work, four_ranks, ref):
    """The ep 2 checkpoint holds the trained routing bias; it resumes bit for bit on the same mesh, and
    within LOSS_TOL on dp_shard 4 without ep and on one process."""
    saved = torch.load(four_ranks / "shard4_ep2.saved_sd.pt")
    bias = saved["transformer.h.0.mlp.expert_bias"]
    assert bias.abs().max() > 0  # moved by after_step, so the resume below needs it
    whole = drv.load_result(four_ranks, "shard4_ep2")
    same = drv.load_result(four_ranks, "shard4_ep2_resumed")
    assert same["loaded_step"] == SAVE
    after = range(SAVE + 1, STEPS + 1)
    assert [same["losses"][s] for s in after] == [whole["losses"][s] for s in after]
    assert [same["norms"][s] for s in after] == [whole["norms"][s] for s in after]
    assert _max_diff(drv.load_result(four_ranks, "shard4_from_ep2"), ref, after) < LOSS_TOL
    one = drv.run_scenario(
        {
            "name": "one_from_ep2",
            "strategy": "none",
            "family": "moe",
            "steps": STEPS,
            "seed": 9,
            "load": str(work / "run_ep2" / "checkpoints" / f"step_{SAVE:06d}"),
        },
        work / "out",
    )
    assert one["loaded_step"] == SAVE
    assert _max_diff(one, ref, after) < LOSS_TOL


MOE = dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=64, family="modern", n_experts=4)


@pytest.mark.parametrize(
    "degrees, model, message",
    [
        (dict(dp_shard=2, ep=4), MOE, r"parallel.ep=4 must divide dp_shard x cp = 2"),
        (dict(dp_replicate=4, ep=2), MOE, r"parallel.ep=2 must divide dp_shard x cp = 1"),
        (dict(dp_shard=2, pp=2, ep=2), MOE, r"parallel.ep=2 with parallel.pp=2 is not supported"),
        (dict(dp_shard=3, ep=3), MOE, r"parallel.ep=3 must divide model.n_experts=4"),
        (dict(dp_shard=2, ep=2), {**MOE, "n_experts": 0}, r"parallel.ep=2 shards experts but the model is dense"),
        (dict(dp_shard=2, ep=0), MOE, r"parallel.ep=0: the expert parallel degree is a positive integer"),
    ],
)
def test_bad_ep_layouts(degrees, model, message):
    with pytest.raises(MeshError, match=message):
        dims = ParallelDims(
            world_size=degrees.get("dp_shard", 1) * degrees.get("dp_replicate", 1) * degrees.get("pp", 1), **degrees
        )
        check_model(dims, ModelConfig(**model), 64)


def test_ep_with_deepspeed_is_refused():
    with pytest.raises(ConfigError, match=r"deepspeed is data parallel only .* parallel.ep=2"):
        load_config(drv.REPO / "configs" / "moe-demo.yaml", ["parallel.strategy=deepspeed", "parallel.ep=2"])


def test_bad_ep_layouts_are_one_line_from_the_cli(tmp_path_factory, tmp_path):
    """The loop's own check of the degrees (the config cannot know dp_shard before launch)."""
    data = prepared_dataset(tmp_path_factory)
    moe = ["model.family=modern", "model.mlp=swiglu", "model.n_experts=4", "parallel.ep=2"]
    proc = run_cli(["--config", str(DEBUG_YAML), *tiny_overrides(data, tmp_path / "r", *moe)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: parallel.ep=2 must divide dp_shard x cp = 1"), lines


@pytest.mark.slow
def test_ep2_samples_in_bfloat16_through_the_loop(tmp_path_factory, tmp_path):
    """python -m train under torchrun, dp_shard 2 x ep 2 in bfloat16: FSDP casts the dense weights but
    not the experts (outside FSDP), so the log's samples run under the run's autocast, as training and
    evaluation do; without it the experts' fp32 weights meet bf16 rows and the first sample fails."""
    data = prepared_dataset(tmp_path_factory)
    moe = ["model.family=modern", "model.mlp=swiglu", "model.n_experts=4", "parallel.dp_shard=2", "parallel.ep=2"]
    run = ["train.dtype=bfloat16", "train.max_steps=2", "logging.sample_every=2", "logging.sample_tokens=6"]
    args = ["--config", str(DEBUG_YAML), *tiny_overrides(data, tmp_path / "r", *moe, *run)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train"]
    proc = subprocess.run([*cmd, *args], cwd=drv.REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {r["step"]: r["sample"] for r in metrics(tmp_path / "r") if "sample" in r}
    assert list(samples) == [2] and samples[2].startswith(load_config(str(DEBUG_YAML), []).logging.sample_prompt)


def test_ep_is_the_innermost_split_of_dp_shard_x_cp():
    """Ranks of one ep group differ in dp_shard x cp only, ep innermost: with dp_shard 2 x cp 2 x tp 2,
    ranks 0, 2, 4, 6 (tp 0) take ep ranks 0, 1, 0, 1; tp does not change it."""
    ranks = [ParallelDims(dp_shard=2, cp=2, tp=2, ep=2, world_size=8, rank=r).ep_rank for r in range(8)]
    assert ranks == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [ParallelDims(dp_shard=4, ep=4, world_size=4, rank=r).ep_rank for r in range(4)] == [0, 1, 2, 3]
