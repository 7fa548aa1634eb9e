"""`python -m train.lightning` (train/lightning/) against gptrain's own loop, on the CPU, fp32, dropout 0.

    one process   Lightning's losses and val losses are `python -m train`'s, step for step (GPT-2 family
                  with AdamW and cosine; the modern family with Muon + AdamW and WSD)
    resume        a run resumed from its step-5 ModelCheckpoint continues the uninterrupted run's losses
    hand-back     the artifact the run writes samples through eval.sample, and eval.evaluate gives the
                  val loss Lightning logged
    ddp           2 ranks of Lightning's ddp on gloo (torchrun): gptrain's DDP run's losses
    extra         without lightning, `python -m train.lightning` says how to install it in one line, exit 2
(the import rule, that nothing outside train/lightning/ imports lightning, is in tests/test_imports.py)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_extra
from train_helpers import (
    DEBUG_YAML,
    REPO,
    metrics,
    prepared_dataset,
    python_env,
    tiny_config,
    tiny_overrides,
)

from train.loop import run as gptrain

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# fp32, dropout 0: the same model, batches, optimizer and schedule; only the reduction order may differ.
LOSS_TOL = 1e-5
STEPS = 10
# A schedule whose length does not depend on train.max_steps, so that a shorter run that is resumed
# follows the reference's learning rates; validation every 5 steps (2 batches of 4).
COMMON = [f"schedule.total_steps={STEPS}", "train.eval_every=5", "optim.grad_clip=1.0"]
MUON = [
    "model.family=modern",
    "model.bias=false",
    "model.tie_embeddings=false",
    "optim.name=muon",
    "optim.muon_ns_dtype=float32",
    "schedule.name=wsd",
    "schedule.decay_frac=0.5",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_dataset(tmp_path_factory)


def lightning_curves(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(losses, val losses) by gptrain's step numbers from the CSVLogger's files of every (re)start; the
    CSV's step is Lightning's optimizer-step index at logging, one less than the steps done."""
    losses, vals = {}, {}
    for f in sorted((run_dir / "lightning").glob("version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("loss"):
                losses[int(row["step"]) + 1] = float(row["loss"])
            if row.get("val_loss"):
                vals[int(row["step"]) + 1] = float(row["val_loss"])
    return losses, vals


def gptrain_curves(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    records = metrics(run_dir)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    return losses, {r["step"]: r["val_loss"] for r in records if "val_loss" in r and r["step"] > 0}


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=LOSS_TOL), f"step {step}: {got[step]} vs {want[step]}"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    """In this process: gptrain's run, Lightning's uninterrupted run, and a Lightning run stopped after
    step 6 that is resumed from its step-5 checkpoint."""
    require_extra("lightning", "lightning")
    from train.lightning.fit import run as lightning

    root = tmp_path_factory.mktemp("lightning")
    quiet = lambda m: None  # noqa: E731
    gptrain(tiny_config(data, root / "gptrain", *COMMON, f"train.max_steps={STEPS}"), log=quiet)
    full = lightning(tiny_config(data, root / "full", *COMMON, f"train.max_steps={STEPS}"), log=quiet)
    stopped = root / "resumed"
    lightning(tiny_config(data, stopped, *COMMON, "train.max_steps=6", "checkpoint.every=5"), log=quiet)
    ckpt = stopped / "checkpoints" / "step_000005.ckpt"
    assert ckpt.is_file()
    lightning(tiny_config(data, stopped, *COMMON, f"train.max_steps={STEPS}", f"train.resume={ckpt}"), log=quiet)
    # The other family and the other optimizer: modern (RoPE, RMSNorm, SwiGLU, untied) with Muon + AdamW, WSD.
    muon = [*COMMON, "train.max_steps=4", "train.eval_every=0", *MUON]
    gptrain(tiny_config(data, root / "gptrain-muon", *muon), log=quiet)
    lightning(tiny_config(data, root / "muon", *muon), log=quiet)
    return {"root": root, "full": full}


def test_one_process_matches_gptrain(runs):
    losses, vals = lightning_curves(runs["root"] / "full")
    want_losses, want_vals = gptrain_curves(runs["root"] / "gptrain")
    assert len(want_losses) == STEPS and sorted(want_vals) == [5, 10]
    assert_close(losses, want_losses)
    assert_close(vals, want_vals)


def test_modern_family_with_muon_matches_gptrain(runs):
    losses, _ = lightning_curves(runs["root"] / "muon")
    want, _ = gptrain_curves(runs["root"] / "gptrain-muon")
    assert len(want) == 4
    assert_close(losses, want)


def test_resumed_run_continues_the_uninterrupted_losses(runs):
    losses, _ = lightning_curves(runs["root"] / "resumed")  # steps 1-6, then 6-10 again from step 5
    want, _ = lightning_curves(runs["root"] / "full")
    assert_close(losses, want)
    resumed = sorted((runs["root"] / "resumed" / "lightning").glob("version_*/metrics.csv"))[-1]
    assert min(int(r["step"]) for r in csv.DictReader(resumed.open()) if r.get("loss")) == 5  # it restarted at 5


def test_the_artifact_samples_and_evaluates_to_lightnings_val_loss(runs, data):
    from eval.evaluate import main as evaluate
    from eval.sample import main as sample

    artifact = runs["root"] / "full" / "model"
    meta = json.loads((artifact / "model.json").read_text())["metadata"]
    assert meta["tokenizer"] == "bytes" and meta["step"] == STEPS
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sample(["--ckpt", str(artifact), "--prompt", "The ", "--max-new-tokens", "8", "--temperature", "0"])
    assert out.getvalue().startswith("The ") and len(out.getvalue()) > len("The ")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the run's validation: train.eval_batches=2 batches of micro_batch 4
        evaluate(["--ckpt", str(artifact), "--data", str(data), "--batch-size", "4", "--max-batches", "2", "--json"])
    got = json.loads(out.getvalue())["loss"]
    assert runs["full"]["val_loss"] == meta["val_loss"]
    assert got == pytest.approx(runs["full"]["val_loss"], abs=LOSS_TOL)


def test_convert_command_writes_the_same_artifact(runs, tmp_path):
    from safetensors.torch import load_file

    from train.lightning.convert import main as convert

    run_dir = runs["root"] / "full"
    assert convert([str(run_dir), "--out", str(tmp_path / "art")]) == 0
    want = load_file(run_dir / "model" / "model.safetensors")
    got = load_file(tmp_path / "art" / "model.safetensors")
    assert sorted(got) == sorted(want) and all((got[k] == want[k]).all() for k in want)


def torchrun(module: str, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module]
    return subprocess.Popen(
        [*cmd, "--config", str(DEBUG_YAML), *overrides],
        cwd=REPO,
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_rank_ddp_matches_gptrains_ddp(data, tmp_path):
    """Both runs at once: 2 ranks x 1 micro-batch of 4 each step, validation every 5 steps."""
    require_extra("lightning", "lightning")
    extra = [*COMMON, f"train.max_steps={STEPS}", "parallel.strategy=ddp"]
    procs = {
        name: torchrun(module, tiny_overrides(data, tmp_path / name, *extra))
        for name, module in (("lightning", "train.lightning"), ("gptrain", "train"))
    }
    for name, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}:\n{out[-3000:]}"
    losses, vals = lightning_curves(tmp_path / "lightning")
    want_losses, want_vals = gptrain_curves(tmp_path / "gptrain")
    assert len(want_losses) == STEPS
    assert_close(losses, want_losses)
    assert_close(vals, want_vals)
    assert (tmp_path / "lightning" / "model" / "model.safetensors").is_file()


def test_without_lightning_one_line_says_how_to_install(monkeypatch, capsys):
    import importlib

    from model.cli import run

    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning (and lightning.*) raises ImportError
    for name in [m for m in sys.modules if m == "train.lightning" or m.startswith("train.lightning.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, without lightning
    main = importlib.import_module("train.lightning.__main__").main
    assert run(main, ["--config", str(DEBUG_YAML)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[lightning]"' in err


def test_what_lightning_does_not_run_is_one_line(capsys):
    """Checked before any data is read: Lightning's FSDP and DeepSpeed strategies need CUDA, and the mesh
    degrees are gptrain's own loop's."""
    require_extra("lightning", "lightning")
    from model.cli import run
    from train.lightning.__main__ import main

    for override, says in [
        ("parallel.strategy=fsdp", "needs CUDA GPUs"),
        ("parallel.strategy=deepspeed", "needs CUDA GPUs"),
        ("parallel.tp=2", "gptrain's own loop's"),
        ("train.fp8=rowwise", "train.fp8=rowwise is gptrain's own loop's"),
    ]:
        assert run(main, ["--config", str(DEBUG_YAML), "train.device=cpu", override]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
