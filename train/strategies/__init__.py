"""Distributed strategies behind the `Strategy` seam of train/strategy.py.

    ddp.py        DistributedDataParallel; rank 0's model artifact + optimizer state are the checkpoint
    fsdp.py       FSDP2 (`fully_shard`); torch.distributed.checkpoint (DCP) shards in the checkpoint's state/
    deepspeed.py  DeepSpeed ZeRO stage 1/2/3 (the `deepspeed` extra); its engine directory in state/
    config_builder.py  the DeepSpeed config built from ours
    dist.py       what they share: process-group init/teardown, collectives, option checking

`train.strategy.make_strategy` imports `train.strategies.<name>` and calls its
`build(device, spec, **options)`: spec is the frozen StrategySpec, options the fields of the
config's `parallel` section. The checkpoint layout is train/checkpoint.py's alone; each strategy says
which saved states it reads natively (resumes_natively) and loads any other from the strategy-neutral
form (load_portable, train/portable.py).
"""
