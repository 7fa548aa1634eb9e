"""The training loop on CPU: the debug config, learning, init_from, NaN stop, accumulation, bf16, AC."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import (
    DEBUG_YAML,
    metrics,
    run_cli,
    tiny_config,
    train_losses,
    val_losses,
)

import train.loop as loop
from model.io import load_model, load_state
from train.errors import TrainError
from train.loop import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_debug_config_trains_from_the_command_line(data_dir, tmp_path):
    """configs/debug.yaml as written (model, optimizer, sampler), for 2 steps, through `python -m train`."""
    run_dir = tmp_path / "debug"
    proc = run_cli(
        [
            "--config",
            str(DEBUG_YAML),
            f"data.dir={data_dir}",
            f"train.run_dir={run_dir}",
            "train.max_steps=2",
            "train.eval_batches=1",
            "logging.sample_tokens=16",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "sample at step 2" in proc.stdout
    assert (run_dir / "config.yaml").is_file()
    recs = metrics(run_dir)
    assert [r["step"] for r in recs if "loss" in r] == [2]  # log_every 20 -> only the last step
    assert math.isfinite(train_losses(run_dir)[2])
    model, meta = load_model(run_dir)  # the latest checkpoint's artifact
    assert meta["tokenizer"] == "bytes" and meta["step"] == 2 and meta["eot_id"] == 256
    assert model.config.n_layer == 4 and model.config.vocab_size == 257


def test_short_run_lowers_val_loss_and_logs_metrics(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run(tiny_config(data_dir, run_dir, "train.max_steps=40", "train.eval_every=20"), log=lambda m: None)
    vals = val_losses(run_dir)
    assert sorted(vals) == [0, 20, 40]
    assert vals[0] > math.log(257) - 0.3  # untrained: about uniform over the bytes vocabulary
    assert vals[40] < vals[0] - 1.5, vals  # it learned byte statistics at least
    assert out["val_loss"] == vals[40] and out["step"] == 40
    rec = [r for r in metrics(run_dir) if "loss" in r][-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "ms_per_step", "peak_mem_gb"):
        assert math.isfinite(rec[key]) and rec[key] >= 0, key
    assert rec["tokens"] == 40 * 256 and rec["tokens_per_s"] > 0 and 0 < rec["mfu"]


def test_init_from_artifact_starts_from_its_weights_with_a_fresh_schedule(data_dir, tmp_path):
    src = tmp_path / "src"
    run(tiny_config(data_dir, src, "train.max_steps=6", "train.eval_every=6"), log=lambda m: None)
    src_val = val_losses(src)[6]
    dst = tmp_path / "dst"
    artifact = src / "checkpoints" / "step_000006" / "model"
    # lr 0: the weights stay those of the artifact, so the first eval must reproduce its val loss
    out = run(
        tiny_config(
            data_dir, dst, f"train.init_from={artifact}", "train.max_steps=2", "train.eval_every=1", "optim.lr=0"
        ),
        log=lambda m: None,
    )
    assert out["step"] == 2  # a fresh step count: not resumed at 6
    assert val_losses(dst)[0] == pytest.approx(src_val, abs=1e-6)
    _, src_sd, _ = load_state(artifact)
    _, dst_sd, _ = load_state(dst)
    assert all(torch.equal(src_sd[k], dst_sd[k]) for k in src_sd)
    from train.checkpoint import TrainState
    from train.portable import from_checkpoint

    ckpt = dst / "checkpoints" / "step_000002"
    state = TrainState(**torch.load(ckpt / "train_state.pt", weights_only=True))
    (tmp_path / "work").mkdir()
    portable = from_checkpoint(ckpt, ckpt / "state", state, tmp_path / "work")
    assert {int(s["step"]) for s in portable.state.values()} == {2}  # a new AdamW, not the source's


def test_init_from_a_missing_path_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(TrainError, match="init_from"):
        run(tiny_config(data_dir, tmp_path / "x", f"train.init_from={tmp_path / 'nope'}"), log=lambda m: None)


def test_nonfinite_loss_stops_naming_the_step_and_never_saves_it(data_dir, tmp_path, monkeypatch):
    real, calls = loop.train_step, []

    def poisoned(*args, **kwargs):
        loss, norm = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), norm

    monkeypatch.setattr(loop, "train_step", poisoned)
    run_dir = tmp_path / "nan"
    # log every 5 steps: the NaN of step 3 is caught by the check before step 4's save
    cfg = tiny_config(data_dir, run_dir, "train.max_steps=10", "checkpoint.every=2", "logging.log_every=5")
    with pytest.raises(TrainError, match=r"non-finite .* at step 3"):
        run(cfg, log=lambda m: None)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_000002"]
    assert (ckpts / "latest").read_text().strip() == "step_000002"


def test_world_size_without_a_strategy_is_refused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainError, match="parallel.strategy=none"):
        run(tiny_config(data_dir, tmp_path / "ws"), log=lambda m: None)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    proc = run_cli(["--config", str(DEBUG_YAML), f"data.dir={tmp_path / 'none'}", f"train.run_dir={tmp_path / 'r'}"])
    assert proc.returncode == 2
    assert "python -m data.prepare" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_profiler_trace_and_tensorboard(data_dir, tmp_path):
    run_dir = tmp_path / "prof"
    run(
        tiny_config(data_dir, run_dir, "train.max_steps=5", "logging.profile_steps=2", "logging.tensorboard=true"),
        log=lambda m: None,
    )
    trace = run_dir / "profile" / "trace_rank0.json"
    assert trace.is_file() and '"traceEvents"' in trace.read_text()[:10_000]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_bench_prints_the_comparison(capsys):
    from train.bench import main as bench

    assert (
        bench(
            [
                "--steps",
                "1",
                "--warmup",
                "1",
                "--settings",
                "baseline,fused",
                "model.n_layer=1",
                "model.n_embd=32",
                "model.block_size=32",
                "train.tokens_per_step=128",
                "train.micro_batch=4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "fp32 eager, for-loop AdamW (baseline)" in out and "1.00x" in out and "fastest:" in out
    assert "avx512_bf16/amx: " in out  # which CPU: bf16 is fast only where it has bf16 units


def test_unigram_baseline(data_dir):
    from train.unigram import unigram_losses

    entropy, cross = unigram_losses(data_dir)
    assert 2.5 < entropy < math.log(257) and entropy - 0.1 < cross < entropy + 0.3


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.dtype=float16", "float16 needs CUDA"),
        pytest.param(
            "train.device=cuda",
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_device_and_dtype_errors(data_dir, tmp_path, override, message):
    with pytest.raises(TrainError, match=message):
        run(tiny_config(data_dir, tmp_path / "e", override), log=lambda m: None)
    assert not (tmp_path / "e").exists()


def test_parallelize_checkpoints_then_compiles_every_block_in_place():
    """The one place where AC and compile are applied (torchtitan's order), names unchanged."""
    from model import GPT, ModelConfig
    from train.parallel.parallelize import apply_ac_and_compile as parallelize
    from train.strategy import StrategySpec

    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    names = list(model.state_dict())
    parallelize(model, StrategySpec())
    assert all(b._compiled_call_impl is None and "forward" not in vars(b) for b in model.transformer.h)
    parallelize(model, StrategySpec(activation_checkpointing=True, compile=True))
    for block in model.transformer.h:
        assert "forward" in vars(block)  # train/ac.py's checkpointed forward, on the instance
        assert block._compiled_call_impl is not None  # nn.Module.compile(): in place, no wrapper
    assert list(model.state_dict()) == names


def test_bench_runs_a_document_masked_model_without_an_eot_id(capsys):
    """train.bench's batches are random tokens with no dataset: model.doc_mask takes the vocabulary's
    last id as <|endoftext|> instead of failing for want of model.eot_id."""
    from train.bench import main as bench

    args = ["--steps", "1", "--warmup", "1", "--settings", "baseline", "model.n_layer=1", "model.n_embd=32"]
    args += ["model.block_size=32", "train.tokens_per_step=128", "train.micro_batch=4", "model.doc_mask=true"]
    assert bench(args) == 0
    assert "fp32 eager, for-loop AdamW (baseline)" in capsys.readouterr().out
