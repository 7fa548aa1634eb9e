"""train.plan and train/footprint.py against real runs on the CPU.

- Parameter, gradient and optimizer bytes per rank: the planner's numbers for a meta model against
  the storages a real run allocates: one process (AdamW and Muon), FSDP on 2 ranks, DeepSpeed ZeRO
  1, 2 and 3 on 2 ranks (tests/plan_probe.py under torchrun, gloo: one launch per world size).
- Activations: the planner's estimate (fake-tensor traces of 1 and 2 blocks at batch 1 and 2,
  extrapolated) against the peak that torch's MemTracker measures on a real forward + backward of
  the whole model at the real micro-batch (gradients preallocated, so that the peak less parameters,
  buffers and gradients is the activations'), for the demo and gpt2-124m configs.
- The command: a table and a ready launch line; user errors in one line, exit 2; the pre-flight decision.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import dist_driver as drv
import pytest
import torch
from conftest import require_extra

from model import GPT
from train.config import OptimSection, load_config
from train.footprint import Layout, activation_bytes, meta_model, state_bytes
from train.hardware import BY_KEY
from train.optim import build_optimizer
from train.plan import model_config, preflight_message
from train.plan.__main__ import main

REPO = Path(__file__).resolve().parents[1]
SLACK = 4096  # bytes: the optimizer step leaves 1-2 KiB of scalars (norms, flags) beside the state


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_single_process_state_bytes_equal_a_real_step(optimizer):
    mcfg = drv.model_config("modern")
    model = GPT(mcfg)
    opt = build_optimizer(model, OptimSection(name=optimizer, fused=False))
    x, y = drv.global_batch(1)
    model(x, y).backward()
    opt.step()
    planned = state_bytes(meta_model(mcfg), Layout(), "float32", optimizer)
    assert storage_bytes([*model.parameters(), *model.buffers()]) == planned.params
    assert storage_bytes(p.grad for p in model.parameters()) == planned.grads
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert storage_bytes(state) == planned.optimizer


MESH_CASES = [
    pytest.param({"tp": 2}, 2, Layout(tp=2), id="tp2"),
    pytest.param({"dp_shard": 2, "tp": 2}, 4, Layout(dp_shard=2, tp=2), id="dp_shard2-tp2"),  # FSDP over tp shards
]
FAMILIES = ["gpt2", "modern"]


def probe_cases(nproc: int) -> list[dict]:
    """Every layout of one world size, measured in one launch (tests/plan_probe.py). The mesh cases get
    a 96-token vocabulary, so that tp 2 divides it."""
    cases = []
    if nproc == 2:
        cases.append({"name": "fsdp", "strategy": "fsdp", "options": {}})
        if importlib.util.find_spec("torchao") is not None:
            cases.append({"name": "fsdp_fp8", "strategy": "fsdp", "options": {}, "fp8": "tensorwise"})
        if importlib.util.find_spec("deepspeed") is not None:
            cases += [{"name": f"zero{z}", "strategy": "deepspeed", "options": {"zero_stage": z}} for z in (1, 2, 3)]
    for p in MESH_CASES:
        options, n, _ = p.values
        if n == nproc:
            for family in FAMILIES:
                options = {**options, "_vocab": 96}
                cases.append(
                    {"name": mesh_name(options, family), "strategy": "none", "options": options, "family": family}
                )
    return cases


def mesh_name(options: dict, family: str) -> str:
    return "-".join([*(f"{k}{v}" for k, v in options.items() if k != "_vocab"), family])


def probe_launch(tmp_path_factory, nproc: int) -> dict[str, dict]:
    out = tmp_path_factory.mktemp(f"plan_probe{nproc}")
    cases = probe_cases(nproc)
    (out / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(REPO / "tests" / "plan_probe.py"), str(out / "cases.json"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return {c["name"]: json.loads((out / f"{c['name']}.json").read_text()) for c in cases}


@pytest.fixture(scope="module")
def probes2(tmp_path_factory) -> dict[str, dict]:
    return probe_launch(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def probes4(tmp_path_factory) -> dict[str, dict]:
    return probe_launch(tmp_path_factory, 4)


@pytest.mark.slow
def test_fsdp_two_ranks_state_bytes_equal_a_real_run(probes2):
    got = probes2["fsdp"]
    f = state_bytes(meta_model(drv.model_config()), Layout(dp_shard=2), "float32")
    assert got["after_wrap"] == pytest.approx(f.params, abs=16)  # rank 0's padded shards
    assert got["after_backward"] - got["after_step"] == f.grads
    assert got["after_step"] - got["after_wrap"] == pytest.approx(f.optimizer, abs=SLACK)


@pytest.mark.slow
def test_fsdp_fp8_state_and_all_gather_bytes_equal_a_real_run(probes2):
    """train.fp8=tensorwise (emulated) under FSDP on 2 ranks: parameters, gradients and optimizer state
    are the plain model's, and the largest all-gather buffer (a block: its converted weights in float8,
    its norms and biases in float32) is half the planner's two-block buffer; without fp8 the same
    buffer holds every element in float32 (the planner's figure for both, from the same formula, must
    tell them apart)."""
    require_extra("torchao", "fp8")
    got, plain = probes2["fsdp_fp8"], probes2["fsdp"]
    model, layout = meta_model(drv.model_config()), Layout(dp_shard=2)
    f = state_bytes(model, layout, "float32", fp8="tensorwise")
    assert got["after_wrap"] == pytest.approx(f.params, abs=16)
    assert got["after_backward"] - got["after_step"] == f.grads
    assert got["after_step"] - got["after_wrap"] == pytest.approx(f.optimizer, abs=SLACK)
    assert 2 * got["largest_fsdp_gather"] == f.temporaries["FSDP all-gather (2 blocks)"]
    fp32 = state_bytes(model, layout, "float32").temporaries["FSDP all-gather (2 blocks)"]
    assert 2 * plain["largest_fsdp_gather"] == fp32 > 2 * got["largest_fsdp_gather"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_two_ranks_state_bytes_equal_a_real_run(probes2, stage):
    require_extra("deepspeed", "deepspeed")
    got = probes2[f"zero{stage}"]
    f = state_bytes(meta_model(drv.model_config()), Layout(dp_replicate=2, zero=stage), "float32")
    moments = f.optimizer - f.master
    if stage == 3:  # gradient buffers and the reduce bucket stay allocated from the engine's start
        everything = f.params + f.optimizer + f.grads + f.temporaries["ZeRO-3 reduce bucket"]
        assert got["after_step"] == pytest.approx(everything, abs=SLACK)
        assert got["after_backward"] == got["after_step"]
        return
    assert got["after_wrap"] == f.params + f.master
    # DeepSpeed's reduction bucket holds a few KB more than the partition during the backward
    assert got["after_backward"] - got["after_step"] == pytest.approx(f.grads, rel=0.06)
    assert got["after_step"] - got["after_wrap"] == pytest.approx(moments, abs=SLACK)


@pytest.mark.slow
@pytest.mark.parametrize("options, nproc, layout", MESH_CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_mesh_state_bytes_equal_a_real_run(request, options, nproc, layout, family):
    """The mesh's TP plan: the tied GPT-2 table stays whole; the modern family's untied head is split by
    vocabulary rows (loss parallel). A 96-token vocabulary, so that tp 2 divides it."""
    probes = request.getfixturevalue(f"probes{nproc}")
    got = probes[mesh_name(options, family)]
    mcfg = dataclasses.replace(drv.model_config(family), vocab_size=96)
    f = state_bytes(meta_model(mcfg), layout, "float32")
    assert got["after_wrap"] == pytest.approx(f.params, abs=16)
    # a 4-rank backward can return while a small collective buffer is still alive; a layout that kept
    # whole or doubled gradients would be off by tens of KiB
    assert got["after_backward"] - got["after_step"] == pytest.approx(f.grads, abs=1024)
    assert got["after_step"] - got["after_wrap"] == pytest.approx(f.optimizer, abs=SLACK)


# ----------------------------------------------------------------------------- activations


def real_model(mcfg, ac: bool, fp8: str = "none") -> GPT:
    from train.ac import apply_activation_checkpointing
    from train.footprint import fp8_model

    torch.manual_seed(0)
    model = fp8_model(mcfg, fp8)  # GPT(mcfg), its Linear layers in emulated float8 where fp8 names a recipe
    if ac:
        apply_activation_checkpointing(model)
    return model


def memtracker_activations(mcfg, batch: int, seq: int, dtype: str, ac: bool, fp8: str = "none") -> int:
    """Peak bytes of a real forward + backward less parameters, buffers and (preallocated) gradients,
    as torch.distributed._tools.mem_tracker.MemTracker counts them."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from train.loop import autocast_ctx

    model = real_model(mcfg, ac, fp8)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    idx = torch.randint(0, mcfg.vocab_size, (batch, seq))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with autocast_ctx(torch.device("cpu"), dtype):
            loss = model(idx, idx)
        loss.backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return sum(v for k, v in peak.items() if str(k).split(".")[-1] in ("ACT", "TEMP", "OTH"))


# (config, overrides, micro-batch, dtype, checkpointing). float32: this CPU-only suite must not depend
# on bf16 units (emulated bf16 takes minutes here); the demo with its bytes vocabulary (257); gpt2-124m
# at one micro-batch of 256 tokens. train.fp8 in torchao's emulation: the estimate traces the converted
# model, the real step runs it (in float32 only: on a CPU, torchao's Float8Linear does not take the
# autocast dtype, which the estimate assumes as on a GPU).
FP8 = ["train.fp8=tensorwise", "train.fp8_emulate=true"]
ACTIVATION_CASES = [
    *[("debug", ["model.vocab_size=257"], mb, "float32", ac) for mb in (1, 8) for ac in (False, True)],
    *[("debug", ["model.vocab_size=257", *FP8], 8, "float32", ac) for ac in (False, True)],
    *[pytest.param(("gpt2-124m", ["data.seq_len=256"], 1, "float32", ac), marks=pytest.mark.slow) for ac in (0, 1)],
]


@pytest.mark.parametrize(
    "case", ACTIVATION_CASES, ids=lambda c: f"{c[0]}-mb{c[2]}-{c[3]}-ac{int(c[4])}" + ("-fp8" * (FP8[0] in c[1]))
)
def test_activation_estimate_within_20_percent_of_a_real_step(case):
    """The estimate from fake traces of 1 and 2 blocks at batch 1 and 2 against the live tensor bytes of
    a real step of the whole model at the real micro-batch (the same dispatch-mode count, on real
    tensors). Where no weights are tied, torch's MemTracker must agree too; with the tied GPT-2 table,
    MemTracker files the head's partial gradient, alive until the embedding's is added to it at the end
    of the backward, under GRAD, so it reports less (docs/distributed.md, "Will it fit?"). Under
    train.fp8, what the conversion adds to the estimate must be what it adds to the real step."""
    from train.footprint import step_peak

    name, extra, mb, dtype, ac = case
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"), extra)
    mcfg, fp8 = model_config(cfg), cfg.train.fp8
    if fp8 != "none":
        require_extra("torchao", "fp8")
    fixed, per_block = activation_bytes(mcfg, mb, cfg.seq_len, dtype, ac, fp8)
    estimate = fixed + per_block * mcfg.n_layer
    idx = torch.randint(0, mcfg.vocab_size, (mb, cfg.seq_len))
    measured = step_peak(real_model(mcfg, ac, fp8), idx, dtype)
    line = f"{name} mb {mb} {dtype} ac {ac} fp8 {fp8}: estimated {estimate / 2**20:.1f} MiB, "
    line += f"measured {measured / 2**20:.1f} MiB"
    if not mcfg.tie_embeddings:
        tracked = memtracker_activations(mcfg, mb, cfg.seq_len, dtype, ac, fp8)
        line += f", MemTracker {tracked / 2**20:.1f} MiB"
        if not ac:  # with checkpointing the peak is in the backward, where MemTracker's snapshot is
            # the moment of the largest total, gradients included, not of the largest activations
            assert estimate == pytest.approx(tracked, rel=0.2), line
    print(line)
    assert estimate == pytest.approx(measured, rel=0.2), line
    if fp8 != "none":  # what fp8 adds (its casts), estimated against measured: 20% of the whole would hide it
        fixed, per_block = activation_bytes(mcfg, mb, cfg.seq_len, dtype, ac)
        plain = step_peak(real_model(mcfg, ac), idx, dtype)
        added, real_added = estimate - fixed - per_block * mcfg.n_layer, measured - plain
        assert real_added > 0 and added == pytest.approx(real_added, rel=0.1), (added, real_added)


# ----------------------------------------------------------------------------- the command


def test_plan_prints_a_table_and_a_launch_line(capsys):
    main(["--config", str(REPO / "configs/gpt2-124m.yaml"), "--gpus", "8", "--gpu", "h100-sxm"])
    out = capsys.readouterr().out
    assert "recommended (the fastest that fits)" in out
    line = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("bash launch.sh")]
    assert line and line[0].startswith("bash launch.sh --nproc 8 ") and "configs/gpt2-124m.yaml" in line[0]


def test_plan_marks_what_does_not_fit(capsys):
    main(["--config", str(REPO / "configs/gpt2-124m.yaml"), "--gpus", "1", "--gpu", "l40s", "--top", "100"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith(("single", "rep", "shard", "zero"))]
    assert any(" NO " in r for r in rows) and any(" yes " in r for r in rows)
    # some micro-batch fits an L40S's 48 GB with checkpointing and not without
    fits = {(r.split()[1], r.split()[2]): " yes " in r for r in rows}
    assert any(not fits[(mb, "-")] and fits.get((mb, "on")) for mb, ac in fits if ac == "-")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "h900"], "--gpu 'h900': choose one of"),
        (["--gpus", "3", "--nodes", "2"], "multiple of --nodes"),
        (["model.n_layr=2"], "model.n_layr"),
        (["--gpu", "a100-80g", "train.fp8=tensorwise"], "--gpu a100-80g has no fp8 tensor cores"),
    ],
)
def test_plan_user_errors_are_one_line_exit_2(args, message):
    r = subprocess.run(
        [sys.executable, "-m", "train.plan", "--config", "configs/debug.yaml", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_preflight_names_the_biggest_item_and_a_layout_that_fits():
    cfg = load_config(str(REPO / "configs/gpt2-124m.yaml"), ["train.micro_batch=64"])
    msg = preflight_message(cfg, 1, BY_KEY["a100-40g"])
    assert msg is not None and "biggest item: activations" in msg
    assert "train.micro_batch=" in msg or "train.activation_checkpointing=true" in msg
    assert preflight_message(load_config(str(REPO / "configs/gpt2-124m.yaml"), []), 8, BY_KEY["h100-sxm"]) is None


@pytest.mark.slow
def test_gpu_check_dry_run_chains_every_step(tmp_path):
    """tests/gpu_check.sh's CPU dry run: every step runs at tiny sizes and the summary says ok."""
    env = {**os.environ, "GPTRAIN_GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "tests/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = r.stdout.split("step               status")[1].splitlines()[1:]
    steps = {line.split()[0]: line.split()[1] for line in summary if line.strip()}
    assert steps == dict.fromkeys(["cuda-tests", "train-bench", "plan-vs-measured", "race", "eval-bench"], "ok")


def test_launch_overrides_name_the_layout():
    """A mixed mesh is spelled out degree by degree; the shorthands and DeepSpeed by their strategy."""
    from train.plan import overrides

    cfg = load_config(str(REPO / "configs/gpt2-124m.yaml"), [])
    assert overrides(cfg, Layout(dp_shard=4, tp=2, micro_batch=32)) == [
        "parallel.dp_replicate=1",
        "parallel.dp_shard=4",
        "parallel.cp=1",
        "parallel.tp=2",
        "parallel.pp=1",
    ]
    assert overrides(cfg, Layout(dp_shard=8, micro_batch=8, ac=True)) == [
        "parallel.strategy=fsdp",
        "train.micro_batch=8",
        "train.activation_checkpointing=true",
    ]
    assert overrides(cfg, Layout(dp_replicate=8, zero=3, micro_batch=32))[:2] == [
        "parallel.strategy=deepspeed",
        "parallel.zero_stage=3",
    ]
