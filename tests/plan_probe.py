"""Run by torchrun from tests/test_plan.py: the bytes a real run of each layout allocates per rank.

    torchrun --nproc_per_node=2 tests/plan_probe.py CASES.json OUT_DIR

CASES.json is a list of {"name", "strategy", "options", "family", "fp8"}: make_strategy's name and
options (e.g. deepspeed {"zero_stage": 3}, none {"tp": 2}), and train.fp8's recipe (emulated; default
none); the cases run one after the other in one process group, so that one launch measures every
layout of a world size.

Each case wraps tests/dist_driver.py's tiny GPT with make_strategy(...).wrap and the driver's AdamW,
runs two steps through the loop's call sequence, and counts the bytes of every tensor storage that is
alive and was not before the model was built (found through the garbage collector, plus each
parameter's .grad and the optimizer state, which may have no Python object of their own): after wrap
(the parameters, and DeepSpeed's fp32 master partition), after the second backward (plus the
gradients) and after the second step (plus the optimizer state); and the largest FSDP2 all-gather
output buffer. Rank 0 writes OUT_DIR/NAME.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import dist_driver as drv
import torch
import torch.distributed as dist

from train.parallel.build import make_strategy
from train.strategy import StrategySpec, unwrap


def storages(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, int]:
    found: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            local = t.to_local() if hasattr(t, "to_local") else t
            local = getattr(local, "_tensor", local)  # torchao's fp8 all-gather wrapper holds the weight
            st = local.untyped_storage()
            found[st.data_ptr()] = st.nbytes()

    for o in gc.get_objects():
        try:
            add(o)
        except Exception:  # objects that look like tensors but have no storage (fake, sparse)
            continue
    for p in unwrap(model).parameters():
        add(p)
        add(p.grad)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    return found


SETTLE_S, SETTLE_TRIES = 0.05, 40
FSDP_GATHERS: list[int] = []  # bytes of every FSDP2 all-gather output buffer of the case being measured


def record_fsdp_gathers() -> None:
    """Append the bytes of each FSDP2 all-gather's output (the whole unit, from every rank) to FSDP_GATHERS."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    gather = group.foreach_all_gather

    def recording(*args, **kwargs):
        res = gather(*args, **kwargs)
        if res is not None:
            FSDP_GATHERS.append(res.all_gather_output.numel() * res.all_gather_output.element_size())
        return res

    group.foreach_all_gather = recording


def measure(name: str, options: dict, family: str, precision: str = "fp32", fp8: str = "none") -> dict:
    spec = StrategySpec(precision=precision, grad_accum_steps=1, grad_clip=1.0)
    options = dict(options)
    vocab = options.pop("_vocab", drv.VOCAB)
    s = make_strategy(name, torch.device("cpu"), spec, **options)
    gc.collect()
    # Every object alive now (the imported modules' hundreds of thousands) leaves the collector's
    # generations: the scans below then walk what the case creates only, a hundredth of it.
    gc.freeze()
    before = set(storages(torch.nn.Module(), torch.optim.SGD([torch.zeros(1)])))
    torch.manual_seed(0)
    mcfg = dataclasses.replace(drv.model_config(family), vocab_size=vocab)
    bare = drv.GPT(mcfg)
    if fp8 != "none":  # train.fp8 in torchao's emulation, converted before the layout as the loop does
        from train import fp8 as float8

        float8.convert(bare, fp8, emulate=True, fsdp=getattr(s, "dims", None) is not None and s.dims.uses_fsdp)
    FSDP_GATHERS.clear()
    model, opt = s.wrap(bare, drv.build_optimizer)
    del bare

    def new(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
        """Bytes of the storages alive now and not before, once they have settled: a collective still
        running on gloo's worker threads holds its tensors for a moment after the call that started it
        returned, so the count is taken again until two counts SETTLE_S apart agree."""
        dist.barrier()
        last = None
        for _ in range(SETTLE_TRIES):
            gc.collect()
            count = sum(v for k, v in storages(model, opt).items() if k not in before)
            if count == last:
                break
            last = count
            time.sleep(SETTLE_S)
        return count

    res = {"after_wrap": new(model, opt)}
    x, y = (t % vocab for t in drv.global_batch(1))
    dims = getattr(s, "dims", None)  # the mesh's: tp / cp ranks of one replica read the same rows
    dp, dp_rank = (dims.dp_size, dims.dp_rank) if dims is not None else (s.world_size, s.rank)
    rows = drv.GLOBAL_BATCH // dp
    x, y = x[dp_rank * rows : (dp_rank + 1) * rows], y[dp_rank * rows : (dp_rank + 1) * rows]
    for step in range(2):
        if hasattr(s, "forward_backward"):  # the mesh's seam: loss parallel needs its context
            s.forward_backward([(x, y)], contextlib.nullcontext())
        else:
            with s.sync_context(is_last=True):
                loss = model(x, y)
                s.backward(loss)
            del loss
        if step == 1:
            res["after_backward"] = new(model, opt)
        s.clip_and_step()
        s.zero_grad()
    res["after_step"] = new(model, opt)
    res["largest_fsdp_gather"] = max(FSDP_GATHERS, default=0)
    del model, opt
    gc.collect()
    s.teardown()
    return res


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    dist.init_process_group("gloo")
    record_fsdp_gathers()
    for case in cases:
        res = measure(
            case["strategy"], case.get("options", {}), case.get("family", "gpt2"), fp8=case.get("fp8", "none")
        )
        if dist.get_rank() == 0:
            (out / f"{case['name']}.json").write_text(json.dumps(res))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
