"""DeepSpeed, the one engine outside the torch-native device mesh (train/parallel/), behind the same
`Strategy` seam of train/strategy.py.

    deepspeed.py       DeepSpeed ZeRO stage 1/2/3 (the `deepspeed` extra); its engine directory in state/
    config_builder.py  the DeepSpeed config built from ours

`train.parallel.build.make_strategy` calls `train.strategies.deepspeed.build(device, spec, **options)`. A
checkpoint of the native mesh arrives through the strategy-neutral form (load_portable,
train/portable.py), and the mesh reads a DeepSpeed checkpoint the same way.
"""
