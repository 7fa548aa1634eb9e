"""Async tensor parallel (parallel.async_tp): what it asks of the run, one line each (from the config,
and at start-up with the resolved device and degrees, before any process group), and what switching it
on does (the tp group's symmetric memory registered, inductor's micro-pipeline TP pass on). Its speed-up
needs CUDA GPUs and is not measured here."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from train_helpers import DEBUG_YAML

from train.config import load_config
from train.errors import ConfigError
from train.parallel.dims import MeshError, ParallelDims
from train.strategy import StrategySpec

ON = ["parallel.async_tp=true"]
TP_LINE = (
    "parallel.async_tp=true overlaps tensor parallel's collectives with its matmuls: set parallel.tp > 1, "
    "or parallel.async_tp=false"
)
COMPILE_LINE = (
    "parallel.async_tp=true is a pass of torch.compile (inductor) over the compiled blocks: set "
    "train.compile=true, or parallel.async_tp=false"
)
CUDA_LINE = (
    "parallel.async_tp=true needs CUDA GPUs (symmetric memory), and this run is on cpu: set parallel.async_tp=false"
)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (ON, TP_LINE),
        (ON + ["parallel.tp=2"], COMPILE_LINE),
        (ON + ["parallel.tp=2", "train.compile=true", "train.device=cpu"], CUDA_LINE),
    ],
)
def test_config_refuses_what_async_tp_cannot_run(overrides, line):
    with pytest.raises(ConfigError) as e:
        load_config(DEBUG_YAML, overrides)
    assert str(e.value) == line


def test_config_takes_async_tp_with_tp_compile_and_a_gpu():
    for device in ("auto", "cuda"):  # auto: checked again at start-up, once the device is known
        cfg = load_config(DEBUG_YAML, ON + ["parallel.tp=2", "train.compile=true", f"train.device={device}"])
        assert cfg.parallel.async_tp and cfg.parallel_options()["async_tp"]


@pytest.mark.parametrize(
    "degrees, compile, line",
    [
        (dict(tp=2, world_size=2), True, CUDA_LINE),  # train.device=auto on a machine without CUDA
        (dict(tp=-1, world_size=1), True, TP_LINE),  # tp = the rest = 1
        (dict(tp=2, world_size=2), False, COMPILE_LINE),
    ],
)
def test_start_up_refuses_async_tp_before_any_process_group(degrees, compile, line):
    from train.parallel.mesh_strategy import MeshStrategy

    with pytest.raises(MeshError) as e:
        MeshStrategy(ParallelDims(**degrees), "cpu", StrategySpec(compile=compile), async_tp=True)
    assert str(e.value) == line
    assert not dist.is_initialized()


def test_parallelize_with_async_tp_registers_the_tp_group_and_switches_on_the_inductor_pass():
    """parallelize on a real one-rank gloo mesh named tp (the degree says tp is on; one process can build
    no larger tp group): without async_tp nothing changes, with it the tp group's symmetric memory is
    registered and inductor's pass is on. Both are device-independent registrations; the fused kernels
    that use them run on CUDA only, when the compiled blocks run."""
    import torch._inductor.config as inductor
    from torch.distributed import _symmetric_memory as symm_mem
    from torch.distributed.device_mesh import init_device_mesh

    from model.config import ModelConfig
    from model.gpt import GPT
    from train.parallel.parallelize import parallelize

    cfg = ModelConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32, family="modern")
    dims = ParallelDims(tp=2, world_size=2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    before, name = inductor._micro_pipeline_tp, None
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        name = mesh["tp"].get_group().group_name
        parallelize(GPT(cfg), dims, mesh, StrategySpec())
        assert not inductor._micro_pipeline_tp and not symm_mem.is_symm_mem_enabled_for_group(name)
        parallelize(GPT(cfg), dims, mesh, StrategySpec(), async_tp=True)
        assert inductor._micro_pipeline_tp and symm_mem.is_symm_mem_enabled_for_group(name)
    finally:
        inductor._micro_pipeline_tp = before
        symm_mem._group_name_to_store.pop(name, None)
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_loops_optimizer_steps_a_tp_model_whose_embeddings_stay_plain(name):
    """Tensor parallel without FSDP leaves the replicated embeddings plain tensors beside DTensor blocks;
    torch's fused and foreach AdamW kernels refuse such a mix, so the loop's optimizer (fused by default
    where the device has it) steps them one by one, and optim.fused=true says what to do in one line."""
    from torch.distributed.device_mesh import init_device_mesh

    from model.config import ModelConfig
    from model.dtensor import is_dtensor
    from model.gpt import GPT
    from train.config import OptimSection
    from train.errors import TrainError
    from train.optim import build_optimizer
    from train.parallel.parallelize import parallelize

    cfg = ModelConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=32)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = GPT(cfg)
        parallelize(
            model,
            ParallelDims(tp=2, world_size=2),
            init_device_mesh("cpu", (1,), mesh_dim_names=("tp",)),
            StrategySpec(),
        )
        kinds = {n: is_dtensor(p) for n, p in model.named_parameters()}
        assert not kinds["transformer.wte.weight"] and any(kinds.values())  # the premise: a mix
        before = {
            n: p.detach().full_tensor().clone() if is_dtensor(p) else p.detach().clone()
            for n, p in model.named_parameters()
        }
        opt = build_optimizer(model, OptimSection(name=name, lr=1e-2, muon_ns_dtype="float32"))
        x = torch.randint(0, 96, (2, 16))
        loss = model(x, x)
        loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            after = p.detach().full_tensor() if is_dtensor(p) else p.detach()
            assert not torch.equal(after, before[n]), f"{n} did not step"
        with pytest.raises(TrainError, match="optim.fused=false"):
            build_optimizer(model, OptimSection(name=name, fused=True))
    finally:
        dist.destroy_process_group()
