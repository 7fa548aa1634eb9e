"""Torch-native parallelism on one device mesh (torchtitan's layout of the same code).

dims.py           ParallelDims: the degrees (dp_replicate, dp_shard, cp, tp, pp; ep), their check, this
                  rank's coordinates, and the one DeviceMesh with its flattened submeshes
world.py          torchrun's environment, the process group, the collectives every engine shares
parallelize.py    the model transforms in torchtitan's order: TP + SP (+ loss parallel), activation
                  checkpointing, per-block compile, FSDP2 / HSDP / DDP
mesh_strategy.py  MeshStrategy: the Strategy seam for every mesh layout; DCP checkpoints
build.py          make_strategy: the config's parallel section -> MeshStrategy, PipelineStrategy or DeepSpeed
context.py        context parallel (sequence sharding, K/V all-gather attention)
pipeline.py       pipeline parallel (torch.distributed.pipelining stages and schedules)
pipeline_strategy.py  MeshStrategy with a pp dimension: the seam over this rank's stages
expert.py         expert parallel for MoE blocks (experts sharded over ep, tokens by all-to-all) and
                  MoE under tensor parallel
"""
