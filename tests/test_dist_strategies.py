"""DDP and FSDP2 against the one-process run, and resume across world sizes (CPU, gloo, torchrun).

Three torchrun launches run every multi-process scenario (tests/dist_driver.py drives the Strategy
interface with the loop's exact call sequence), in the order the checkpoints need:
    one rank   FSDP on 1 rank; saves a 1-rank FSDP checkpoint
    two ranks  DDP, DDP + accumulation, FSDP (fp32, accumulation + activation checkpointing,
               bf16 params), and resumes 1->2 and 2->2 for DDP and FSDP
    one rank   FSDP resumes the 2-rank checkpoint (2->1)
The reference is the same model, data and optimizer under parallel.strategy=none, in this process.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import dist_driver as drv
import pytest
import torch

from model.io import ArtifactError, load_model

pytestmark = pytest.mark.slow

# fp32 throughout; the only differences are floating-point reduction order (per-rank partial
# sums, all-reduce / reduce-scatter), measured at ~5e-7 on the losses after 6 AdamW steps.
LOSS_TOL = 1e-5
PARAM_TOL = 1e-5
STEPS, SAVE_AT = 6, 3


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def ref(work) -> dict:
    """One process (parallel.strategy=none), the whole global batch per step; also saves a checkpoint."""
    out = work / "out"
    out.mkdir()
    return {
        "gpt2": drv.run_scenario(
            {
                "name": "ref",
                "strategy": "none",
                "steps": STEPS,
                "save_at": SAVE_AT,
                "save_dir": str(work / "run_single"),
                "sample_at": 3,
            },
            out,
        ),
        "modern": drv.run_scenario(
            {"name": "ref_modern", "strategy": "none", "steps": STEPS, "family": "modern", "sample_at": 3}, out
        ),
    }


def ckpt(work: Path, run: str) -> str:
    return str(work / run / "checkpoints" / f"step_{SAVE_AT:06d}")


@pytest.fixture(scope="module")
def one_rank_first(work, ref) -> Path:
    out = work / "out"
    drv.launch_ok(
        {
            "out": str(out),
            "scenarios": [
                {
                    "name": "fsdp_w1",
                    "strategy": "fsdp",
                    "steps": STEPS,
                    "save_at": SAVE_AT,
                    "save_dir": str(work / "run_f1"),
                },
            ],
        },
        1,
        work,
        "one_rank_first",
    )
    return out


@pytest.fixture(scope="module")
def two_ranks(work, ref, one_rank_first) -> Path:
    out = work / "out"
    fresh = {"seed": 5}  # resumed runs start from other weights: only load() can make them match
    drv.launch_ok(
        {
            "out": str(out),
            "driver_group": True,
            "scenarios": [
                {"name": "ddp", "strategy": "ddp", "steps": STEPS, "check_replicas": True},
                {
                    "name": "ddp_acc",
                    "strategy": "ddp",
                    "steps": STEPS,
                    "accum": 2,
                    "check_replicas": True,
                    "save_at": SAVE_AT,
                    "save_dir": str(work / "run_d2"),
                },
                {
                    "name": "fsdp",
                    "strategy": "fsdp",
                    "steps": STEPS,
                    "save_at": SAVE_AT,
                    "save_dir": str(work / "run_f2"),
                    "save_model": False,  # a periodic FSDP checkpoint: shards only
                    "sample_at": 3,
                },
                {
                    "name": "fsdp_acc_ac",
                    "strategy": "fsdp",
                    "steps": STEPS,
                    "accum": 2,
                    "family": "modern",
                    "options": {"activation_checkpointing": True},
                    "sample_at": 3,
                },
                {
                    "name": "fsdp_bf16",
                    "strategy": "fsdp",
                    "steps": STEPS,
                    "options": {"fsdp_param_dtype": "bf16", "fsdp_reduce_dtype": "fp32"},
                    "sample_at": 3,
                },
                {"name": "ddp_1to2", "strategy": "ddp", "steps": STEPS, "load": ckpt(work, "run_single"), **fresh},
                {"name": "ddp_2to2", "strategy": "ddp", "steps": STEPS, "load": ckpt(work, "run_d2"), **fresh},
                {"name": "fsdp_1to2", "strategy": "fsdp", "steps": STEPS, "load": ckpt(work, "run_f1"), **fresh},
                {
                    "name": "fsdp_2to2",
                    "strategy": "fsdp",
                    "steps": STEPS,
                    "accum": 2,
                    "load": ckpt(work, "run_f2"),
                    **fresh,
                },
                # another strategy: through the neutral form (train/portable.py)
                {"name": "ddp_loads_fsdp", "strategy": "ddp", "steps": STEPS, "load": ckpt(work, "run_f2"), **fresh},
            ],
        },
        2,
        work,
        "two_ranks",
    )
    return out


@pytest.fixture(scope="module")
def one_rank_after(work, two_ranks) -> Path:
    out = work / "out"
    drv.launch_ok(
        {
            "out": str(out),
            "scenarios": [
                {"name": "fsdp_2to1", "strategy": "fsdp", "steps": STEPS, "load": ckpt(work, "run_f2"), "seed": 5},
            ],
        },
        1,
        work,
        "one_rank_after",
    )
    return out


def assert_matches(res: dict, ref: dict, first_step: int = 1) -> None:
    steps = list(range(first_step, STEPS + 1))
    assert sorted(res["losses"]) == steps
    for k in steps:
        assert abs(res["losses"][k] - ref["losses"][k]) < LOSS_TOL, (k, res["losses"][k], ref["losses"][k])
        assert math.isclose(res["norms"][k], ref["norms"][k], rel_tol=1e-4), (k, res["norms"][k], ref["norms"][k])


def assert_params_close(out: Path, name: str, ref_name: str) -> None:
    got, want = torch.load(out / f"{name}.final.pt"), torch.load(out / f"{ref_name}.final.pt")
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=PARAM_TOL, rtol=0, msg=k)


@pytest.mark.parametrize("name", ["ddp", "ddp_acc"])
def test_ddp_two_ranks_equal_one_process(two_ranks, ref, name):
    res = drv.load_result(two_ranks, name)
    assert res["world_size"] == 2
    assert_matches(res, ref["gpt2"])
    assert res["params_equal_across_ranks"]
    assert_params_close(two_ranks, name, "ref")


@pytest.mark.parametrize("name, family", [("fsdp", "gpt2"), ("fsdp_acc_ac", "modern")])
def test_fsdp_two_ranks_equal_one_process(two_ranks, ref, name, family):
    """Losses, norms and final weights; and samples (greedy and drawn) through the strategy's KV-cache
    decoder after step 3, when the backward has resharded every parameter (the decode step calls the
    root's methods, which FSDP must gather for as it does for forward); training goes on undisturbed."""
    res = drv.load_result(two_ranks, name)
    assert_matches(res, ref[family])
    assert res["samples"] == ref[family]["samples"] and len(res["samples"][1]) == 8
    assert res["tied"] == (family == "gpt2")  # a tied lm_head stays the same tensor as wte
    assert_params_close(two_ranks, name, "ref" if family == "gpt2" else "ref_modern")


def test_fsdp_one_rank_equals_one_process(one_rank_first, ref):
    res = drv.load_result(one_rank_first, "fsdp_w1")
    assert res["world_size"] == 1
    assert_matches(res, ref["gpt2"])


def test_fsdp_bf16_mixed_precision_runs(two_ranks, ref):
    res = drv.load_result(two_ranks, "fsdp_bf16")
    diffs = [abs(res["losses"][k] - ref["gpt2"]["losses"][k]) for k in range(1, STEPS + 1)]
    assert all(math.isfinite(v) for v in res["losses"].values())
    assert max(diffs) < 2e-2  # bf16 compute tracks the fp32 run...
    assert max(diffs) > 1e-6  # ...but is not it: the policy really cast the parameters
    # the training log's samples decode in the dtype the blocks compute in (a bfloat16 KV cache)
    assert [len(s) for s in res["samples"]] == [8, 8] and all(0 <= t < drv.VOCAB for s in res["samples"] for t in s)


@pytest.mark.parametrize("name", ["ddp_1to2", "ddp_2to2", "fsdp_1to2", "fsdp_2to2", "fsdp_2to1"])
def test_resume_across_world_sizes(two_ranks, one_rank_after, ref, name):
    res = drv.load_result(two_ranks if name != "fsdp_2to1" else one_rank_after, name)
    assert res["loaded_step"] == SAVE_AT
    assert res["extra_roundtrip"]  # the loop's state (tensors, nested python) comes back as saved
    assert_matches(res, ref["gpt2"], first_step=SAVE_AT + 1)  # continues as the uninterrupted run


def test_ddp_checkpoint_resumes_in_one_process(work, two_ranks, ref):
    """A 2-rank DDP checkpoint has the a format one process (parallel.strategy=none) continues."""
    res = drv.run_scenario(
        {"name": "ddp_2to1", "strategy": "none", "steps": STEPS, "seed": 5, "load": ckpt(work, "run_d2")}, work / "out"
    )
    assert res["loaded_step"] == SAVE_AT and res["extra_roundtrip"]
    assert_matches(res, ref["gpt2"], first_step=SAVE_AT + 1)


def test_ddp_continues_an_fsdp_checkpoint(two_ranks, ref):
    """Across strategies (a checkpoint without model/: the weights come from the DCP shards)."""
    res = drv.load_result(two_ranks, "ddp_loads_fsdp")
    assert res["loaded_step"] == SAVE_AT and res["extra_roundtrip"]
    assert_matches(res, ref["gpt2"], first_step=SAVE_AT + 1)


def test_fsdp_checkpoint_layout(work, one_rank_first, two_ranks):
    """state/ holds the DCP shards (one file per rank); model/ is the gathered artifact when asked for
    (best / final), and a checkpoint without it names train.consolidate."""
    ck = Path(ckpt(work, "run_f2"))
    assert sorted(p.name for p in ck.iterdir()) == ["rng_rank00000.pt", "rng_rank00001.pt", "state", "train_state.pt"]
    assert (ck / "state" / ".metadata").is_file()
    assert len(list((ck / "state").glob("*.distcp"))) == 2
    state = torch.load(ck / "train_state.pt", weights_only=True)  # no pickle code execution
    assert state["step"] == SAVE_AT and state["strategy"] == "fsdp" and state["world_size"] == 2
    with pytest.raises(ArtifactError, match=f"python -m train.consolidate {ck}"):
        load_model(work / "run_f2")
    # the 1-rank FSDP run saved with its artifact: rank 0's gathered full state dict
    model, metadata = load_model(work / "run_f1")
    saved = torch.load(work / "out" / "fsdp_w1.saved_sd.pt")
    assert metadata == {"step": SAVE_AT, "tokenizer": "bytes"}
    got = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(got[k], v), k


def test_consolidate_writes_the_trained_weights(work, two_ranks):
    from train.consolidate import consolidate, main

    run = work / "run_f2_copy"
    shutil.copytree(work / "run_f2", run)
    assert main([str(run)]) == 0
    art = Path(ckpt(work, "run_f2_copy")) / "model"
    assert (art / "model.safetensors").is_file()
    model, metadata = load_model(run)  # the run now resolves to that artifact
    saved = torch.load(work / "out" / "fsdp.saved_sd.pt")
    got = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(got[k], v), k
    assert metadata == {"step": SAVE_AT, "tokenizer": "bytes"}
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ArtifactError, match="nothing to consolidate"):
        consolidate(run)  # consolidated once
    other = work / "elsewhere"
    other.mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        consolidate(ckpt(work, "run_f2"), out=other)
    assert main([ckpt(work, "run_f2"), "--out", str(other), "--overwrite"]) == 0
    assert load_model(other)[1]["step"] == SAVE_AT
    # A DDP run already holds its artifact.
    with pytest.raises(ArtifactError, match="nothing to consolidate"):
        consolidate(work / "run_d2")
