"""Distributed strategies behind the `Strategy` seam of train/strategy.py.

    ddp.py        DistributedDataParallel; checkpoints in the single-process format
    fsdp.py       FSDP2 (`fully_shard`); sharded torch.distributed.checkpoint (DCP) checkpoints
    deepspeed.py  DeepSpeed ZeRO stage 1/2/3 (the `deepspeed` extra)
    config_builder.py  the DeepSpeed config built from ours
    dist.py       what they share: process-group init/teardown, collectives, option checking

`train.strategy.make_strategy` imports `train.strategies.<name>` and calls its
`build(device, **options)`; options are the fields of the config's `parallel` section.
"""
