"""The device mesh against the one-process run (CPU, gloo, torchrun; tests/dist_driver.py drives the
Strategy seam with the loop's call sequence):
    two ranks   tp 2 (sequence parallel; loss parallel on the untied head, a replicated tied head; Muon)
    four ranks  dp_shard 2 x tp 2, dp_replicate 2 x dp_shard 2 (HSDP), and a resume of the 2 x 2
                checkpoint on dp_shard 4, whose checkpoint one process then continues
Losses and gradient norms equal the reference within LOSS_TOL for every step, and each layout is shown
applied: the parameters' DTensor placements and local shapes, the attention's local heads, and the
sequence-sharded activations between blocks.
"""

from __future__ import annotations

from pathlib import Path

import dist_driver as drv
import pytest

pytestmark = pytest.mark.slow

# fp32; the only differences are reduction order (all-gather / reduce-scatter / all-reduce partial sums)
LOSS_TOL = 1e-5
STEPS = 6
C = 64  # dist_driver's n_embd


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Checkpoints in run_*/, the driver's results (and the references') in out/."""
    work = tmp_path_factory.mktemp("mesh")
    (work / "out").mkdir()
    return work


@pytest.fixture(scope="module")
def ref(work) -> dict:
    out = work / "out"
    refs = {
        f: drv.run_scenario({"name": f"ref_{f}", "strategy": "none", "steps": STEPS, "family": f}, out)
        for f in ("gpt2", "modern")
    }
    muon = {"name": "ref_muon", "strategy": "none", "steps": STEPS, "family": "modern", "optim": "muon"}
    return {**refs, "muon": drv.run_scenario(muon, out)}


@pytest.fixture(scope="module")
def two_ranks(work) -> Path:
    out = work / "out"
    tp2 = {"strategy": "none", "options": {"tp": 2}, "steps": STEPS, "record_layout": True}
    spec = {
        "out": str(out),
        "driver_group": True,
        "scenarios": [
            *({"name": f"tp2_{f}", "family": f, **tp2} for f in ("gpt2", "modern")),
            {"name": "tp2_muon", "family": "modern", "optim": "muon", **tp2},
        ],
    }
    drv.launch_ok(spec, 2, work, "two")
    return out


@pytest.fixture(scope="module")
def four_ranks(work) -> Path:
    out = work / "out"
    spec = {
        "out": str(out),
        "driver_group": True,
        "scenarios": [
            {
                "name": "shard2_tp2",
                "strategy": "fsdp",
                "options": {"dp_shard": 2, "tp": 2},
                "family": "modern",
                "steps": STEPS,
                "save_at": 3,
                "save_dir": str(work / "run_2x2"),
                "save_model": False,
                "record_layout": True,
            },
            {
                "name": "hsdp",
                "strategy": "none",
                "options": {"dp_replicate": 2, "dp_shard": 2},
                "family": "gpt2",
                "steps": STEPS,
                "record_layout": True,
            },
            {  # the 2 x 2 checkpoint, resharded by DCP onto 4 FSDP ranks
                "name": "shard4_from_2x2",
                "strategy": "fsdp",
                "family": "modern",
                "steps": STEPS,
                "load": str(work / "run_2x2" / "checkpoints" / "step_000003"),
                "save_at": 5,
                "save_dir": str(work / "run_4"),
                "save_model": False,
                "seed": 7,
            },
        ],
    }
    drv.launch_ok(spec, 4, work, "four")
    return out


def _assert_matches(res: dict, ref: dict, steps) -> None:
    for step in steps:
        assert abs(res["losses"][step] - ref["losses"][step]) < LOSS_TOL, (
            step,
            res["losses"][step],
            ref["losses"][step],
        )
        assert abs(res["norms"][step] - ref["norms"][step]) < LOSS_TOL * max(1.0, ref["norms"][step]), step


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_tp2_equals_one_process(two_ranks, ref, family):
    res = drv.load_result(two_ranks, f"tp2_{family}")
    _assert_matches(res, ref[family], range(1, STEPS + 1))


def test_tp2_muon_equals_one_process(two_ranks, ref):
    """Muon under tp: each sharded matrix gathered for Newton-Schulz, its local part kept."""
    _assert_matches(drv.load_result(two_ranks, "tp2_muon"), ref["muon"], range(1, STEPS + 1))


def test_tp2_plan_is_applied(two_ranks):
    """Megatron's column / row split, sequence parallel norms and activations, local heads, and the
    vocabulary-parallel head where it is untied (the tied head stays the whole token table)."""
    modern = drv.load_result(two_ranks, "tp2_modern")["layout"]
    gpt2 = drv.load_result(two_ranks, "tp2_gpt2")
    h0 = "transformer.h.0."
    qkv_rows = (4 + 2 * 2) * (C // 4)  # (n_head + 2 n_kv_head) x head_dim
    assert modern[h0 + "attn.c_attn.weight"] == {"placements": ["S(0)"], "local": [qkv_rows // 2, C]}
    assert modern[h0 + "attn.c_proj.weight"] == {"placements": ["S(1)"], "local": [C, C // 2]}
    assert modern[h0 + "mlp.c_fc.weight"]["placements"] == ["S(0)"]
    assert modern[h0 + "mlp.c_proj.weight"]["placements"] == ["S(1)"]
    assert modern[h0 + "ln_1.weight"]["placements"] == ["R"]  # sequence-parallel norm
    assert modern["lm_head.weight"] == {"placements": ["S(0)"], "local": [49, C]}  # 97 rows over 2
    assert modern["heads"] == [[2, 1], [2, 1]]  # this rank's query and key/value heads
    assert gpt2["layout"]["transformer.wte.weight"]["placements"] is None  # tied head: the whole token table
    assert gpt2["layout"][h0 + "attn.c_attn.bias"]["placements"] == ["S(0)"]
    # the last block's input is this rank's half of the sequence: (rows, SEQ / 2, C)
    assert gpt2["block_input"][0] == [drv.GLOBAL_BATCH, drv.SEQ // 2, C]


def test_shard2_tp2_equals_one_process(four_ranks, ref):
    res = drv.load_result(four_ranks, "shard2_tp2")
    _assert_matches(res, ref["modern"], range(1, STEPS + 1))
    # FSDP over dp_shard composed with TP: 2-D DTensors, a quarter of c_attn per rank
    qkv = res["layout"]["transformer.h.0.attn.c_attn.weight"]
    assert len(qkv["placements"]) == 2 and qkv["local"] == [(4 + 2 * 2) * (C // 4) // 4, C]
    assert res["block_input"][0] == [drv.GLOBAL_BATCH // 2, drv.SEQ // 2, C]


def test_hsdp_equals_one_process(four_ranks, ref):
    res = drv.load_result(four_ranks, "hsdp")
    _assert_matches(res, ref["gpt2"], range(1, STEPS + 1))
    # HSDP: replicated across the 2 replica groups, sharded inside each
    w = res["layout"]["transformer.h.0.mlp.c_fc.weight"]
    assert w == {"placements": ["R", "S(0)"], "local": [4 * C // 2, C]}


def test_resume_across_meshes(work, four_ranks, ref):
    """2 x 2 (dp_shard x tp) -> 4 (dp_shard) -> 1 process, each continuing within LOSS_TOL."""
    res = drv.load_result(four_ranks, "shard4_from_2x2")
    assert res["loaded_step"] == 3 and res["extra_roundtrip"]
    _assert_matches(res, ref["modern"], range(4, STEPS + 1))
    one = drv.run_scenario(
        {
            "name": "one_from_4",
            "strategy": "none",
            "family": "modern",
            "steps": STEPS,
            "seed": 9,
            "load": str(work / "run_4" / "checkpoints" / "step_000005"),
        },
        work / "out",
    )
    assert one["loaded_step"] == 5
    _assert_matches(one, ref["modern"], [6])
