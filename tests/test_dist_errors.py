"""User errors of the distributed strategies: one clear message each, raised before any process
group exists (so these run in the pytest process), and the DeepSpeed config builder."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from train.errors import TrainError
from train.parallel.build import make_strategy
from train.parallel.world import DistributedSetupError, StrategyError
from train.strategies.config_builder import build_ds_config
from train.strategy import StrategySpec

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launcher(monkeypatch):
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_unknown_option_names_the_closest_valid_one(name, no_launcher):
    # A TrainError: `python -m train` prints the one line, not a traceback.
    with pytest.raises(TrainError, match=r"unknown option parallel\.zero_stag .*did you mean parallel\.zero_stage"):
        make_strategy(name, torch.device("cpu"), zero_stag=2)


def test_strategy_spec_is_frozen_and_checked():
    spec = StrategySpec(precision="bf16", grad_accum_steps=2)
    with pytest.raises(AttributeError):
        spec.grad_accum_steps = 4  # frozen: fixed before wrap()
    with pytest.raises(ValueError, match="precision='bfloat16'"):
        StrategySpec(precision="bfloat16")
    with pytest.raises(ValueError, match="grad_accum_steps=0"):
        StrategySpec(grad_accum_steps=0)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_without_torchrun_says_how_to_launch(name, no_launcher):
    with pytest.raises(DistributedSetupError, match="torchrun --nproc_per_node=N"):
        make_strategy(name, torch.device("cpu"), StrategySpec(activation_checkpointing=True), strategy=name)


def test_bad_fsdp_dtype(no_launcher):
    with pytest.raises(ValueError, match="fsdp_param_dtype='bf17'.*bf16, fp16, fp32"):
        make_strategy("fsdp", torch.device("cpu"), fsdp_param_dtype="bf17")


def test_fsdp_refuses_float16_before_any_process_group(no_launcher):
    with pytest.raises(StrategyError, match="fsdp runs in bfloat16 or float32"):
        make_strategy("fsdp", torch.device("cpu"), StrategySpec(precision="fp16"))


def test_rank_outside_world_size(monkeypatch):
    for k, v in dict(RANK="3", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistributedSetupError, match="RANK=3 is outside WORLD_SIZE=2"):
        make_strategy("ddp", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(monkeypatch):
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistributedSetupError, match="CUDA is not available"):
        make_strategy("fsdp", torch.device("cuda"))


def test_deepspeed_missing_says_what_to_install(monkeypatch, no_launcher):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[deepspeed\]'"):
        make_strategy("deepspeed", torch.device("cpu"))


def test_deepspeed_accelerator_mismatch(monkeypatch, no_launcher):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda but the device is cpu"):
        make_strategy("deepspeed", torch.device("cpu"))


# ---- the DeepSpeed config -------------------------------------------------------------
def ds_config(**kw) -> dict:
    args = dict(
        path=None,
        overrides={},
        zero_stage=2,
        offload_optimizer=False,
        grad_accum_steps=4,
        grad_clip=1.0,
        precision="fp32",
        world_size=2,
        cuda=False,
    )
    return build_ds_config(**{**args, **kw})


def test_ds_config_layers_json_dict_and_our_values(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "overlap_comm": True},
                "train_micro_batch_size_per_gpu": 8,
                "steps_per_print": 50,
            }
        )
    )
    cfg = ds_config(
        path=path,
        overrides={"zero_optimization": {"reduce_bucket_size": 1000}},
        zero_stage=3,
        offload_optimizer=True,
        precision="bf16",
    )
    z = cfg["zero_optimization"]
    assert z == {
        "stage": 3,
        "overlap_comm": True,
        "reduce_bucket_size": 1000,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
    }
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 1.0
    assert cfg["train_batch_size"] == 8 * 4 * 2 and cfg["steps_per_print"] == 50
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # the loop's torch AdamW is allowed with offload


def test_ds_config_stage_from_json_when_ours_is_unset(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert ds_config(path=path, zero_stage=None)["zero_optimization"]["stage"] == 1
    assert ds_config(zero_stage=None)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(overrides={"zero_optimization": {"stage": 3}}), "parallel.zero_stage=2 but .*zero_optimization.stage=3"),
        (
            dict(overrides={"gradient_accumulation_steps": 2}),
            "gradient accumulation=4 but .*gradient_accumulation_steps=2",
        ),
        (dict(overrides={"train_batch_size": 5}), "train_batch_size=5"),
        (dict(overrides={"optimizer": {"type": "Adam"}}), "remove 'optimizer'"),
        (dict(overrides={"fp16": {"enabled": True}}, precision="bf16"), "both bf16 and fp16"),
        (dict(zero_stage=0), "use parallel.strategy=ddp"),
        (
            dict(offload_optimizer=True, overrides={"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}),
            "offload_optimizer.device='nvme'",
        ),
    ],
)
def test_ds_config_conflicts_are_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        ds_config(**kw)


def test_ds_config_file_errors(tmp_path):
    with pytest.raises(StrategyError, match="deepspeed_config: .*not found"):
        ds_config(path=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ds_config(path=bad)
