"""Run by torchrun from test_train_properties.py: does a sharding strategy apply activation checkpointing?

    torchrun --nproc_per_node=2 tests/ac_probe.py {fsdp|deepspeed} OUT_DIR

For activation_checkpointing False and True, wraps a tiny GPT with make_strategy(...).wrap, runs
one forward+backward through the strategy and counts each block's MLP forward calls (2 when the
backward recomputes the block). Writes OUT_DIR/calls_rank{R}.json: {"False": [..], "True": [..]}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from model import GPT, ModelConfig
from model.gpt import MLP
from train.parallel.build import make_strategy
from train.strategy import StrategySpec


def count_calls(name: str, ac: bool) -> list[int]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    blocks = {id(b.mlp): i for i, b in enumerate(model.transformer.h)}
    spec = StrategySpec(precision="fp32", grad_accum_steps=1, grad_clip=0.0, activation_checkpointing=ac)
    strategy = make_strategy(name, torch.device("cpu"), spec)
    wrapped, optimizer = strategy.wrap(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    calls: Counter = Counter()
    handles = [
        # a pre-hook: the recomputation stops inside the MLP once every saved tensor is back
        m.register_forward_pre_hook(lambda mod, a: calls.update([blocks[id(mod)]]))
        for m in model.modules()
        if isinstance(m, MLP)
    ]
    x = torch.randint(0, 64, (2, 16))
    with strategy.sync_context(is_last=True):
        loss = wrapped(x, x)
        strategy.backward(loss)  # the recomputation happens here
    for h in handles:
        h.remove()
    strategy.teardown()
    # release every wrapped object before the process group goes (gloo aborts at exit otherwise)
    del wrapped, optimizer, model, strategy, loss
    gc.collect()
    return [calls[i] for i in sorted(blocks.values())]


def main() -> None:
    name, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")  # ours: each strategy joins it and leaves it to us
    result = {str(ac): count_calls(name, ac) for ac in (False, True)}
    (out / f"calls_rank{os.environ['RANK']}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
