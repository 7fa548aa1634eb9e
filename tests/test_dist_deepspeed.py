"""DeepSpeed ZeRO stage 1, 2 and 3 against the one-process run (CPU, gloo, torchrun, fp32).

One torchrun launch with two ranks runs every scenario (tests/dist_driver.py); each engine gets
the torch AdamW of the driver's build_optimizer (DeepSpeed's own optimizers JIT-compile C++).
"""

from __future__ import annotations

import math

import dist_driver as drv
import pytest
import torch
from conftest import require_extra

from model.io import load_model

require_extra("deepspeed", "deepspeed")
pytestmark = pytest.mark.slow

LOSS_TOL = 1e-5  # fp32; only the reduction order differs (measured ~5e-7)
PARAM_TOL = 1e-5
STEPS, SAVE_AT = 6, 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ds")
    out = work / "out"
    out.mkdir()
    ref = drv.run_scenario({"name": "ref", "strategy": "none", "steps": STEPS, "sample_at": 2}, out)
    z3_ckpt = str(work / "run_z3" / "checkpoints" / f"step_{SAVE_AT:06d}")
    spec = {
        "out": str(out),
        "driver_group": True,
        "scenarios": [
            {
                "name": "zero1",
                "strategy": "deepspeed",
                "steps": STEPS,
                "options": {"zero_stage": 1},
                "check_replicas": True,
            },
            {
                "name": "zero1_acc",
                "strategy": "deepspeed",
                "steps": STEPS,
                "accum": 2,
                "options": {"zero_stage": 1},
                "check_replicas": True,
            },
            {
                "name": "zero2_acc",
                "strategy": "deepspeed",
                "steps": STEPS,
                "accum": 2,
                "options": {"zero_stage": 2},
                "check_replicas": True,
            },
            {
                "name": "zero2_offload",
                "strategy": "deepspeed",
                "steps": STEPS,
                "accum": 2,
                "options": {"zero_stage": 2, "offload_optimizer": True},
                "check_replicas": True,
            },
            {
                "name": "zero3_acc",
                "strategy": "deepspeed",
                "steps": STEPS,
                "accum": 2,
                "options": {"zero_stage": 3},
                "save_at": SAVE_AT,
                "save_dir": str(work / "run_z3"),
                "sample_at": 2,
            },
            {
                "name": "zero3_resume",
                "strategy": "deepspeed",
                "steps": STEPS,
                "accum": 2,
                "options": {"zero_stage": 3},
                "load": z3_ckpt,
                "seed": 5,
            },
            {
                "name": "zero3_bf16_ac",
                "strategy": "deepspeed",
                "steps": STEPS,
                "accum": 2,
                "precision": "bf16",
                "options": {"zero_stage": 3, "activation_checkpointing": True},
            },
            {  # another ZeRO stage: resharded through the neutral form (train/portable.py)
                "name": "zero2_loads_zero3",
                "strategy": "deepspeed",
                "steps": STEPS,
                "options": {"zero_stage": 2},
                "load": z3_ckpt,
                "seed": 5,
            },
        ],
    }
    proc = drv.launch(spec, 2, work / "spec.json")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"ref": ref, "out": out, "z3_ckpt": z3_ckpt}


@pytest.mark.parametrize("name", ["zero1", "zero1_acc", "zero2_acc", "zero2_offload", "zero3_acc"])
def test_zero_two_ranks_equal_one_process(runs, name):
    res, ref = drv.load_result(runs["out"], name), runs["ref"]
    assert res["world_size"] == 2 and res["tied"]
    for k in range(1, STEPS + 1):
        assert abs(res["losses"][k] - ref["losses"][k]) < LOSS_TOL, (k, res["losses"][k], ref["losses"][k])
        # DeepSpeed's pre-clip global norm (clipping at 1.0 is active on the first steps)
        assert math.isclose(res["norms"][k], ref["norms"][k], rel_tol=1e-4), (k, res["norms"][k], ref["norms"][k])
    if name != "zero3_acc":  # ZeRO 1/2 all-gather the updated parameters into every replica
        assert res["params_equal_across_ranks"]
    else:  # the training log's samples, drawn mid-run through the partitioned model: one process's
        assert res["samples"] == ref["samples"] and len(ref["samples"][0]) == 8
    got, want = torch.load(runs["out"] / f"{name}.final.pt"), torch.load(runs["out"] / "ref.final.pt")
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=PARAM_TOL, rtol=0, msg=k)


def test_zero3_bf16_with_activation_checkpointing_runs(runs):
    res, ref = drv.load_result(runs["out"], "zero3_bf16_ac"), runs["ref"]
    diffs = [abs(res["losses"][k] - ref["losses"][k]) for k in range(1, STEPS + 1)]
    assert max(diffs) < 2e-2  # bf16 parameters (fp32 master weights in the optimizer) track fp32...
    assert max(diffs) > 1e-6  # ...without being it: the engine really computes in bf16


def test_zero3_checkpoint_resumes_and_holds_an_artifact(runs):
    res, ref = drv.load_result(runs["out"], "zero3_resume"), runs["ref"]
    assert res["loaded_step"] == SAVE_AT and res["extra_roundtrip"]
    for k in range(SAVE_AT + 1, STEPS + 1):
        assert abs(res["losses"][k] - ref["losses"][k]) < LOSS_TOL, k
    # rank 0's consolidated artifact: the gathered fp32 weights at the save, readable by eval/
    model, metadata = load_model(runs["z3_ckpt"])
    saved = torch.load(runs["out"] / "zero3_acc.saved_sd.pt")
    got = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(got[k], v), k
    assert metadata["step"] == SAVE_AT


def test_resume_with_another_zero_stage_continues(runs):
    res, ref = drv.load_result(runs["out"], "zero2_loads_zero3"), runs["ref"]
    assert res["loaded_step"] == SAVE_AT and res["extra_roundtrip"]
    for k in range(SAVE_AT + 1, STEPS + 1):
        assert abs(res["losses"][k] - ref["losses"][k]) < LOSS_TOL, (k, res["losses"][k], ref["losses"][k])
