"""Run by torchrun from tests/test_fp8.py: tests/dist_driver.py's loop sequence on a GPT whose Linear
layers are torchao's emulated Float8Linear (train/fp8.py), under tensor parallel or FSDP, on gloo.

    torchrun --nproc_per_node=2 tests/fp8_tp_probe.py SPEC.json

SPEC.json: {"out": DIR, "scenarios": [...]}: dist_driver's scenarios, each with "fp8": the recipe.
Rank 0 writes dist_driver's DIR/NAME.json, with "float8_gathers": the float8 all-gathers this rank
ran (dtype -> count), and DIR/NAME.final.pt. The same model factory builds the one-process references
in the pytest process (fp8_gpt).

gloo has no float8 dtypes, so on a CPU mesh train/fp8.py keeps torch's plain styles. Here
`gloo_float8_gathers` moves a float8 tensor's bytes as uint8 through torchao's all-gather override
(torchao/float8/float8_ops.py, allgather_fp8), the same bytes NCCL moves in float8, counts each
gather, and tells train/fp8.py that the mesh moves float8, so that the plan takes torchao's float8
styles, as on a GPU.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import dist_driver as drv
import torch
import torch.distributed as dist

from train import fp8

RECIPE = {"fp8": "tensorwise", "fsdp": False}  # the scenario being run: its recipe, and whether FSDP shards it
GATHERS: Counter = Counter()  # float8 dtype name -> all-gathers run on this rank
plain_gpt = drv.GPT


def fp8_gpt(cfg):
    """dist_driver's GPT, its Linear layers converted to emulated float8 before any layout's transform,
    as the loop does (under FSDP: weights all-gathered in float8)."""
    model = plain_gpt(cfg)
    fp8.convert(model, RECIPE["fp8"], emulate=True, fsdp=RECIPE["fsdp"])
    return model


def gloo_float8_gathers() -> None:
    from torchao.float8 import float8_ops
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    def gather(aten_op, args, kwargs=None):
        t = args[0]  # a Float8TrainingTensor: float8 _data, its scale
        out = aten_op(t._data.contiguous().view(torch.uint8), *args[1:], **(kwargs or {}))
        out = torch.ops._c10d_functional.wait_tensor(out).view(t._data.dtype)
        GATHERS[str(t._data.dtype).removeprefix("torch.")] += 1
        return Float8TrainingTensor(out, t._scale, t._orig_dtype, t._linear_mm_config, t._gemm_input_role)

    op = torch.ops._c10d_functional.all_gather_into_tensor.default
    assert op in float8_ops.FLOAT8_OPS_TABLE, "torchao no longer overrides the float8 all-gather here"
    float8_ops.FLOAT8_OPS_TABLE[op] = gather
    fp8.float8_collectives = lambda mesh: True


def main() -> None:
    from train.parallel.world import init_distributed

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(1)
    drv.GPT = fp8_gpt  # run_scenario builds its model through this name
    gloo_float8_gathers()
    init_distributed("cpu", "driver")
    for sc in spec["scenarios"]:
        RECIPE["fp8"], RECIPE["fsdp"] = sc["fp8"], sc["strategy"] == "fsdp"
        GATHERS.clear()
        res = drv.run_scenario(sc, out)
        if dist.get_rank() == 0:
            (out / f"{sc['name']}.json").write_text(json.dumps({**res, "float8_gathers": dict(GATHERS)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
