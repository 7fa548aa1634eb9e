"""The CUDA paths: NCCL process group, one GPU per rank (cuda:LOCAL_RANK), bf16 parameters.
Skipped without CUDA; runs on 1 or 2 GPUs (torchrun --nproc_per_node=min(2, GPUs))."""

from __future__ import annotations

import importlib.util

import dist_driver as drv
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 6


def test_nccl_strategies_match_the_cpu_reference(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ref = drv.run_scenario({"name": "ref", "strategy": "none", "steps": STEPS}, out)  # CPU, fp32
    scenarios = [
        {"name": "ddp", "strategy": "ddp", "device": "cuda", "steps": STEPS, "accum": 2, "check_replicas": True},
        {"name": "fsdp", "strategy": "fsdp", "device": "cuda", "steps": STEPS},
        {
            "name": "fsdp_bf16",
            "strategy": "fsdp",
            "device": "cuda",
            "steps": STEPS,
            "precision": "bf16",
            "options": {"fsdp_param_dtype": "bf16", "fsdp_reduce_dtype": "fp32"},
        },
    ]
    if importlib.util.find_spec("deepspeed") is not None:
        scenarios.append(
            {
                "name": "zero3_bf16",
                "strategy": "deepspeed",
                "device": "cuda",
                "steps": STEPS,
                "accum": 2,
                "precision": "bf16",
                "options": {"zero_stage": 3},
            }
        )
    nproc = min(2, torch.cuda.device_count())
    proc = drv.launch({"out": str(out), "driver_group": True, "scenarios": scenarios}, nproc, tmp_path / "spec.json")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for sc in scenarios:
        res = drv.load_result(out, sc["name"])
        assert res["world_size"] == nproc
        # fp32 on GPU differs from the CPU run only by kernels and reduction order; bf16 by more.
        tol = 2e-2 if sc.get("precision") == "bf16" else 1e-4
        for k in range(1, STEPS + 1):
            assert abs(res["losses"][k] - ref["losses"][k]) < tol, (sc["name"], k, res["losses"][k])
        if sc.get("check_replicas"):
            assert res["params_equal_across_ranks"]
