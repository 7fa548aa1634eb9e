"""The typed config: YAML + overrides, the unknown-key / wrong-type errors, the shipped configs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, ModelConfig
from train.config import Config, ConfigError, config_from_dict, load_config, parse_override
from train.optim import lr_at, param_groups

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


# A value for every ModelConfig field, none of them its default, consistent with each other.
MODEL_VALUES = dict(
    vocab_size=300,
    block_size=64,
    n_layer=3,
    n_head=6,
    n_kv_head=2,
    n_embd=96,
    family="modern",
    ffn_hidden=200,
    bias=False,
    tie_embeddings=False,
    dropout=0.25,
    pad_vocab_multiple=64,
    rope_theta=500000.0,
    norm_eps=1e-6,
    mlp="swiglu",  # not the field's default (null); mixture-of-experts blocks need it
    qk_norm=True,
    zero_init_proj=True,
    logit_softcap=15.0,
    doc_mask=True,
    doc_positions_restart=True,
    eot_id=299,
    n_experts=4,
    moe_top_k=1,
    n_shared_experts=1,
    moe_every=2,
    moe_first_dense=1,
    moe_hidden=48,
    moe_router="sigmoid",
    moe_norm_topk=False,
    moe_route_scale=2.5,
    moe_aux_loss_coef=0.02,
    moe_z_loss_coef=0.001,
    moe_bias_update_rate=0.001,
    moe_grouped_mm=False,
    extra={"note": "x"},
)


def test_model_values_cover_every_model_config_field():
    """MODEL_VALUES must name each field, so that the two tests below cover a field added later."""
    fields = dataclasses.fields(ModelConfig)
    assert set(MODEL_VALUES) == {f.name for f in fields}
    defaults = ModelConfig()
    assert all(MODEL_VALUES[f.name] != getattr(defaults, f.name) for f in fields)


def test_the_model_section_is_model_config():
    """One declaration: the config's model section is ModelConfig itself, sized to the dataset's
    vocabulary unless model.vocab_size says otherwise."""
    cfg = load_config(None)
    assert type(cfg.model) is ModelConfig and cfg.model.vocab_size is None


def test_every_model_config_field_is_settable_from_yaml(tmp_path):
    path = tmp_path / "m.yaml"
    lines = [f"  {k}: {v!r}" if isinstance(v, str) else f"  {k}: {v}" for k, v in MODEL_VALUES.items()]
    path.write_text("model:\n" + "\n".join(lines) + "\ndata:\n  seq_len: 64\ntrain:\n  tokens_per_step: 512\n")
    cfg = load_config(path, ["train.micro_batch=8"])
    assert dataclasses.asdict(cfg.model) == MODEL_VALUES
    assert ModelConfig(**dataclasses.asdict(cfg.model)) == cfg.model  # what the loop builds from it


def test_every_model_config_field_is_settable_from_overrides():
    overrides = [f"model.{k}={v}" for k, v in MODEL_VALUES.items() if k != "extra"]
    overrides += ["model.extra.note=x", "data.seq_len=64", "train.tokens_per_step=512", "train.micro_batch=8"]
    cfg = load_config(None, overrides)
    assert dataclasses.asdict(cfg.model) == MODEL_VALUES


def test_model_checks_see_the_final_values_whatever_the_order(tmp_path):
    """The file sets grouped-query heads, the command line goes back to plain attention: ModelConfig's
    checks and its n_kv_head default apply to the result, not to a half-updated section."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  family: modern\n  n_head: 8\n  n_kv_head: 2\n  n_embd: 64\n")
    cfg = load_config(path, ["model.family=gpt2", "model.n_kv_head=null", "model.n_head=4"])
    assert (cfg.model.n_head, cfg.model.n_kv_head) == (4, 4)
    with pytest.raises(ConfigError, match="needs model.family: modern"):
        load_config(path, ["model.family=gpt2"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_build(path):
    cfg = load_config(path)
    assert cfg.train.run_dir and cfg.to_dict()["model"]["n_layer"] == cfg.model.n_layer
    mcfg = ModelConfig(**{**dataclasses.asdict(cfg.model), "vocab_size": cfg.model.vocab_size or 50257})
    with torch.device("meta"):
        model = GPT(mcfg)
    assert model.num_params() > 0
    # the global batch divides into whole micro-batches on 1 and on 8 ranks
    per_rank = cfg.train.tokens_per_step // (cfg.seq_len * cfg.train.micro_batch)
    cpu_only = path.name in ("debug.yaml", "mix-demo.yaml", "moe-demo.yaml") or path.name.startswith(
        "race-"
    )  # CPU demos
    assert per_rank >= 1 and (cpu_only or per_rank % 8 == 0)


@pytest.mark.parametrize("name, params", [("gpt2-124m.yaml", 124_439_808), ("gpt2-350m.yaml", 354_823_168)])
def test_gpt2_configs_have_the_paper_sizes(name, params):
    cfg = load_config(REPO / "configs" / name)
    mcfg = ModelConfig(**{**dataclasses.asdict(cfg.model), "vocab_size": 50257, "pad_vocab_multiple": 1})
    with torch.device("meta"):
        assert GPT(mcfg).num_params() == params
    assert cfg.train.tokens_per_step == 524_288 and cfg.optim.betas == [0.9, 0.95]


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 6e-4\n  betas: [0.9, 0.99]\ntrain:\n  max_steps: 10\n")
    cfg = load_config(
        path,
        [
            "train.max_steps=20",
            "optim.weight_decay=0",
            "model.n_kv_head=null",
            "logging.sample_prompt=def f(x):",
            "parallel.deepspeed.zero_optimization.stage=3",
            "train.init_from=runs/x",
        ],
    )
    assert cfg.optim.lr == 6e-4 and isinstance(cfg.optim.lr, float)  # PyYAML reads 6e-4 as a string
    assert cfg.optim.betas == [0.9, 0.99] and cfg.train.max_steps == 20
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.model.n_kv_head == cfg.model.n_head and cfg.logging.sample_prompt == "def f(x):"
    assert cfg.parallel.deepspeed == {"zero_optimization": {"stage": 3}}
    assert cfg.train.init_from == "runs/x"
    assert cfg.train.run_dir == "runs/c"  # defaults to runs/<config name>


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config(REPO / "configs" / "debug.yaml", ["optim.lr=1e-3"])
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-3", "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("optm.lr=1e-3", "did you mean 'optim.lr'?"),
        ("lr=1e-3", "did you mean 'optim.lr'?"),
        ("train.max_step=5", "did you mean 'train.max_steps'?"),
        ("train.max_steps=ten", "config key 'train.max_steps' expects an integer, got 'ten'"),
        ("train.max_steps=2.5", "expects an integer, got 2.5"),
        ("train.compile=yes please", "expects true/false"),
        ("optim.betas=0.9", "expects a list of a number"),
        ("train.dtype=bf16", "did you mean 'bfloat16'?"),
        ("train.tokens_per_step=1000", "must be a multiple of seq_len * micro_batch"),
        ("model.n_head=5", "divisible by model.n_head"),
        ("model.n_layer=0", "model.n_layer must be >= 1; got 0"),
        ("model.n_head=0", "model.n_head must be >= 1; got 0"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("model.family=llama", "model.family must be one of gpt2, modern"),
        ("model.n_headz=4", "did you mean 'model.n_head'?"),
        ("model.bias=maybe", "config key 'model.bias' expects true/false"),
        ("data.seq_len=4096", "exceeds model.block_size"),
        ("train.max_steps", "write section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "debug.yaml", [override])
    assert message in str(e.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(
        ConfigError,
        match=r"bad.yaml: unknown config key 'train.max_stepz' \(did you mean "
        r"'train.max_steps'\?\)",
    ):
        load_config(path)


def test_parse_override_keeps_text():
    assert parse_override("optim.lr=3e-4") == ("optim.lr", "3e-4", "3e-4")
    assert parse_override("train.run_dir=runs/a=b")[1] == "runs/a=b"


def test_cli_config_error_is_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/debug.yaml", "optim.lrr=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_weight_decay_groups():
    model = GPT(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    with_emb, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= {names[id(p)] for p in with_emb["params"]}
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == model.num_params()  # the tied lm_head is counted once


def test_schedules():
    cfg = Config().schedule
    cfg.warmup_steps, cfg.min_lr_ratio = 10, 0.1
    assert lr_at(0, 1.0, cfg, 100) == pytest.approx(0.1) and lr_at(9, 1.0, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, cfg, 100) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_at(100, 1.0, cfg, 100) == pytest.approx(0.1) == lr_at(500, 1.0, cfg, 100)
    lrs = [lr_at(s, 1.0, cfg, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay
    cfg.name, cfg.decay_frac = "wsd", 0.2
    assert lr_at(79, 1.0, cfg, 100) == 1.0  # stable until the last 20%
    assert lr_at(90, 1.0, cfg, 100) == pytest.approx(0.55)  # linear cooldown midpoint
    cfg.wsd_shape = "1-sqrt"
    assert lr_at(90, 1.0, cfg, 100) == pytest.approx(0.1 + 0.9 * (1 - 0.5**0.5))
    cfg.name = "constant"
    assert lr_at(99, 1.0, cfg, 100) == 1.0
