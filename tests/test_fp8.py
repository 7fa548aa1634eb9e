"""FP8 training (train/fp8.py) on the CPU, through torchao's emulation: which layers convert, that the
casts really happen, that a run trains, checkpoints, resumes bit for bit and leaves a plain artifact
that eval/ reads, and the one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
from conftest import require_extra
from train_helpers import (
    DEBUG_YAML,
    REPO,
    python_env,
    run_cli,
    tiny_config,
    tiny_overrides,
    train_losses,
)

from model import GPT, ModelConfig
from train.config import load_config
from train.errors import ConfigError

FP8 = ["train.fp8=tensorwise", "train.fp8_emulate=true", "train.dtype=bfloat16"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_conversion_skips_the_head_and_unaligned_layers_and_really_casts():
    """The head and every Linear with a dim that is not a multiple of 16 stay nn.Linear; the others
    become Float8Linear, whose output differs from the float32 layer's by fp8 rounding (a few percent),
    for both recipes."""
    require_extra("torchao", "fp8")
    from train import fp8
    from train.errors import TrainError

    unaligned = ModelConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=40, family="gpt2", bias=False)
    with pytest.raises(TrainError, match="multiples of 16"):  # c_attn 40x120, c_fc 40x160, ...: none fits
        fp8.convert(GPT(unaligned), "tensorwise", emulate=True, fsdp=False)

    cfg = ModelConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, family="gpt2", bias=False)
    for recipe in ("tensorwise", "rowwise"):
        torch.manual_seed(0)
        model = GPT(cfg)
        model.transformer.h[0].attn.extra = nn.Linear(32, 72, bias=False)  # 72 % 16 != 0: stays high precision
        keys = set(model.state_dict())
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        converted, hook = fp8.convert(model, recipe, emulate=True, fsdp=False)
        kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in linears}
        assert kinds.pop("lm_head") == "Linear"
        assert kinds.pop("transformer.h.0.attn.extra") == "Linear"
        assert set(kinds.values()) == {"Float8Linear"} and converted == len(kinds) == 8
        assert hook is None  # no FSDP: no fp8 all-gather, no scale precompute
        assert set(model.state_dict()) == keys  # same names: checkpoints and artifacts are the plain model's
        layer = model.transformer.h[1].mlp.c_fc
        x = torch.randn(8, 32)
        exact = x @ layer.weight.detach().T  # (8, 128) in float32
        err = ((layer(x) - exact).norm() / exact.norm()).item()
        assert 1e-4 < err < 0.1, (recipe, err)  # rounded to fp8 (e4m3: 3 mantissa bits), not exact


def test_fp8_run_trains_resumes_exactly_and_exports_plain_weights(data_dir, tmp_path, capsys):
    """Emulated fp8 (tensorwise, bf16 elsewhere): the loss falls; resuming from the step-4 checkpoint
    gives the straight run's losses bit for bit; the artifact holds the plain model's float32 tensors
    (no fp8 state) and eval.evaluate / eval.sample read it."""
    require_extra("torchao", "fp8")
    from safetensors import safe_open

    from eval import evaluate, sample
    from train.loop import run

    common = ["train.max_steps=8", "checkpoint.every=4", "optim.lr=1e-2", *FP8]
    lines: list[str] = []
    straight = tmp_path / "straight"
    run(tiny_config(data_dir, straight, *common), log=lines.append)
    assert any("fp8 tensorwise: 8 Linear layers run in float8 (emulated" in line for line in lines), lines
    peak = [line for line in lines if "TFLOP/s" in line]
    assert "measured" in peak[0] and "fp8 emulated in bfloat16, so not the fp8 peak" in peak[0], peak
    losses = train_losses(straight)
    assert sorted(losses) == list(range(1, 9))
    assert sum(losses[s] for s in (6, 7, 8)) / 3 < losses[1] - 0.5, losses

    resumed = tmp_path / "resumed"
    ckpt = straight / "checkpoints" / "step_000004"
    run(tiny_config(data_dir, resumed, *common, f"train.resume={ckpt}"), log=lambda m: None)
    assert train_losses(resumed) == {s: losses[s] for s in range(5, 9)}

    art = straight / "checkpoints" / "step_000008" / "model"
    with safe_open(str(art / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    cfg = ModelConfig.from_dict(json.loads((art / "model.json").read_text())["config"])
    assert set(dtypes) == set(GPT(cfg).state_dict()) - {"lm_head.weight"}  # tied head saved once
    assert set(dtypes.values()) == {torch.float32}

    capsys.readouterr()
    evaluate.main(["--ckpt", str(straight), "--data", str(data_dir), "--max-batches", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["loss"] < losses[1]
    sample.main(["--ckpt", str(straight), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1"])
    assert capsys.readouterr().out.startswith("def ")


def test_fp8_refusals_are_one_line(data_dir, tmp_path):
    """Without fp8 tensor cores (here: a CPU) and without emulation: one line, exit 2. DeepSpeed, which
    fp8 does not compose with, and a bad recipe, are config errors; tensor parallel is accepted."""
    proc = run_cli(
        [
            "--config",
            str(DEBUG_YAML),
            *tiny_overrides(data_dir, tmp_path / "r", "train.fp8=tensorwise", "train.max_steps=2"),
        ],
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip() and "Failed to load" not in line]
    assert len(err) == 1 and "fp8 tensor cores" in err[0] and "train.fp8_emulate=true" in err[0], proc.stderr

    for extra, msg in (
        (["train.fp8=fp4"], "train.fp8"),
        (["train.fp8_emulate=true"], "needs a recipe"),
        (["train.fp8=rowwise", "parallel.strategy=deepspeed"], "not deepspeed"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config(DEBUG_YAML, tiny_overrides(data_dir, tmp_path / "c", *extra))
    for recipe in ("tensorwise", "rowwise"):  # tensor parallel composes (test_fp8_under_tensor_parallel_...)
        load_config(DEBUG_YAML, tiny_overrides(data_dir, tmp_path / "c", f"train.fp8={recipe}", "parallel.tp=2"))


def test_fp8_mfu_uses_the_fp8_peak():
    """A real fp8 run (and the planner's estimate of one) is measured against the table's dense fp8 peak
    (twice bf16's on an H100); an emulated one against train.dtype's."""
    from train.footprint import Layout, meta_model
    from train.fp8 import peak_dtype
    from train.hardware import BY_KEY
    from train.metrics import gpu_table_peak
    from train.plan import Hardware, estimate, model_config

    h100 = "NVIDIA H100 80GB HBM3"
    assert gpu_table_peak(h100, "float8") == 2 * gpu_table_peak(h100, "bfloat16")
    for fp8, emulate, want in (
        ("tensorwise", False, "float8"),
        ("rowwise", False, "float8"),
        ("tensorwise", True, "bfloat16"),
        ("none", False, "bfloat16"),
    ):
        assert peak_dtype(types.SimpleNamespace(fp8=fp8, fp8_emulate=emulate, dtype="bfloat16")) == want

    gpu = BY_KEY["h100-sxm"]
    est = {}
    for fp8 in ("none", "tensorwise"):
        cfg = load_config(REPO / "configs" / "gpt2-124m.yaml", ["train.dtype=bfloat16", f"train.fp8={fp8}"])
        one_gpu = Hardware(gpu, 1, 1, gpu.link_gbps, 50.0)
        est[fp8] = estimate(cfg, meta_model(model_config(cfg)), Layout(micro_batch=8), one_gpu)
    # one GPU, nothing to communicate: the modelled step is compute at the peak, twice as fast in fp8
    assert est["tensorwise"].tokens_per_s == pytest.approx(2 * est["none"].tokens_per_s)
    assert est["tensorwise"].mfu == pytest.approx(est["none"].mfu)


# ----------------------------------------------------------------------------- tensor parallel, FSDP

TP_STEPS = 4
TP_SCENARIOS = {  # name -> (recipe, dist_driver family): GPT-2's Linear layers have biases, the modern's none
    "tp_tensorwise_gpt2": ("tensorwise", "gpt2"),
    "tp_tensorwise_modern": ("tensorwise", "modern"),
    "tp_rowwise_modern": ("rowwise", "modern"),
}
# The one-process fp8 run and tp 2 compute the same casts with the same scales (torchao reduces each
# amax over the DTensor's shards, so a tp shard is scaled by the whole tensor's amax), so they differ
# only where fp32 partial sums meet in another order, as in the fp32 layouts (tests/test_dist_pp_tp.py:
# 1e-5). The failure this guards against, a bias learning from torchao's float8-rounded output
# gradient, moves the GPT-2 loss by 2e-4 and more by step 2.
TP_LOSS_TOL = 1e-5
FSDP_SCENARIO = {"family": "gpt2", "strategy": "fsdp", "steps": TP_STEPS, "sample_at": 2}


@pytest.fixture(scope="module")
def fp8_tp2(tmp_path_factory):
    """One torchrun launch of 2 ranks (gloo): every scenario at parallel.tp=2 (tests/fp8_tp_probe.py)."""
    require_extra("torchao", "fp8")
    import dist_driver as drv

    out = tmp_path_factory.mktemp("fp8_tp") / "out"
    out.mkdir()
    scenarios = [
        {"name": n, "fp8": r, "family": f, "strategy": "none", "options": {"tp": 2}, "steps": TP_STEPS}
        for n, (r, f) in TP_SCENARIOS.items()
    ]
    scenarios.append({"name": "fsdp_tensorwise", "fp8": "tensorwise", **FSDP_SCENARIO})
    spec = out.parent / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "scenarios": scenarios}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(REPO / "tests" / "fp8_tp_probe.py"), str(spec)],
        env=python_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    return out, drv


@pytest.mark.slow
def test_fp8_under_tensor_parallel_matches_one_process(fp8_tp2, monkeypatch):
    """train.fp8 with parallel.tp=2 against one process with the same emulated recipe, model and
    batches: losses and gradient norms agree for tensorwise (both families) and rowwise. Under
    tensorwise the sequence-parallel all-gathers of the attention and MLP inputs move float8 (torchao's
    float8 tensor-parallel styles; e4m3, 2 per block and step), and where no Linear has a bias the
    output gradients of the row-parallel layers are gathered in float8 too (e5m2); rowwise gathers in
    high precision, as torchtitan does."""
    import fp8_tp_probe as probe

    out, drv = fp8_tp2
    monkeypatch.setattr(drv, "GPT", probe.fp8_gpt)
    n_layer = drv.model_config().n_layer
    for name, (recipe, family) in TP_SCENARIOS.items():
        got = drv.load_result(out, name)
        monkeypatch.setitem(probe.RECIPE, "fp8", recipe)
        want = drv.run_scenario({"name": f"ref_{name}", "strategy": "none", "steps": TP_STEPS, "family": family}, out)
        assert sorted(got["losses"]) == list(range(1, TP_STEPS + 1))
        for step in want["losses"]:
            assert got["losses"][step] == pytest.approx(want["losses"][step], abs=TP_LOSS_TOL), (name, step)
            assert got["norms"][step] == pytest.approx(want["norms"][step], rel=TP_LOSS_TOL), (name, step)
        gathers = got["float8_gathers"]
        if recipe == "rowwise":
            assert gathers == {}, name
            continue
        assert gathers.get("float8_e4m3fn") == 2 * n_layer * TP_STEPS, (name, gathers)
        assert ("float8_e5m2" in gathers) == (family == "modern"), (name, gathers)


@pytest.mark.slow
def test_fp8_under_fsdp_trains_and_samples_like_one_process(fp8_tp2, monkeypatch):
    """train.fp8=tensorwise under FSDP on 2 ranks (weights all-gathered in float8): the losses of one
    process with the same recipe, and the training log's samples drawn mid-run through the KV cache
    (which runs under no_grad: torchao's float8 weight wrapper cannot be made in inference mode)."""
    import fp8_tp_probe as probe

    out, drv = fp8_tp2
    monkeypatch.setattr(drv, "GPT", probe.fp8_gpt)
    got = drv.load_result(out, "fsdp_tensorwise")
    monkeypatch.setitem(probe.RECIPE, "fp8", "tensorwise")
    # tensorwise scales each activation by its own amax: the reference's micro-batches are the ranks' rows
    want = drv.run_scenario({**FSDP_SCENARIO, "name": "ref_fsdp_tensorwise", "strategy": "none", "accum": 2}, out)
    for step in want["losses"]:
        assert got["losses"][step] == pytest.approx(want["losses"][step], abs=TP_LOSS_TOL), step
    assert got["samples"] == want["samples"] and len(want["samples"][0]) == 8
