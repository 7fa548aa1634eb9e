"""optim.name=muon: the parameter split, the orthogonalised update, the per-group schedules, Muon's
momentum warmup, exact resume, a real training run, DDP and FSDP against one process, DeepSpeed's
refusal."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
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
from train.config import Config, OptimSection
from train.errors import TrainError
from train.loop import run
from train.optim import MUON_GROUP, MuonAdamW, apply_schedule, build_optimizer, lr_at, muon_momentum_at

QUIET = dict(log=lambda m: None)
MUON = ["optim.name=muon", "optim.muon_lr=0.02", "optim.lr=3e-3"]
# fp32, dropout 0: 2 ranks x 1 micro-batch vs 1 x 2 differ in the gradients' reduction order (~1e-7),
# which a bfloat16 Newton-Schulz (muon_ns_dtype=auto on bf16 hardware) can round to one bf16 ulp.
DIST_LOSS_TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": 50, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16, **kw}))


def group_names(model: GPT, opt: torch.optim.Optimizer) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tied):
    model = tiny_model(family="gpt2", tie_embeddings=tied)
    opt = build_optimizer(model, OptimSection(name="muon"))
    assert isinstance(opt, MuonAdamW)
    groups = group_names(model, opt)
    assert groups[MUON_GROUP] == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    adamw = groups.get("decay", set()) | groups["no_decay"]
    assert "transformer.wte.weight" in groups["no_decay"] and "transformer.wpe.weight" in groups["no_decay"]
    assert "transformer.h.0.ln_1.weight" in adamw and "transformer.h.0.attn.c_attn.bias" in adamw
    # tied: the head is the token table's Parameter, stepped once (by AdamW); untied: its own matrix
    assert ("lm_head.weight" in groups.get("decay", ())) is not tied  # tied: no AdamW matrix decays
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(params)  # no parameter in two groups
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters())
    # each group its own learning rate and the right optimizer's hyper-parameters
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name[MUON_GROUP]["lr"] == 0.02 and by_name[MUON_GROUP]["momentum"] == 0.95
    assert by_name["no_decay"]["lr"] == 6e-4 and "betas" in by_name["no_decay"]


def test_adamw_stays_the_default():
    model = tiny_model()
    opt = build_optimizer(model, Config().optim)
    assert type(opt) is torch.optim.AdamW and [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]


@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_muon_update_is_orthogonalised(ns_dtype):
    """Feed one matrix an ill-conditioned gradient (singular values 0.01..1): Muon's step has (nearly)
    equal singular values (Newton-Schulz maps each to ~1; Jordan et al. 2024: to within [0.5, 1.5]),
    scaled by lr * sqrt(max(1, rows/cols))."""
    model = tiny_model(family="gpt2")
    cfg = OptimSection(name="muon", muon_lr=0.1, muon_momentum=0.0, muon_nesterov=False, muon_ns_dtype=ns_dtype)
    opt = build_optimizer(model, cfg)
    w = model.transformer.h[0].mlp.c_fc.weight  # (64, 16)
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 16, generator=g))  # (64, 16)
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))  # (16, 16)
    w.grad = u @ torch.diag(torch.logspace(-2, 0, 16)) @ v.T  # (64, 16), condition number 100
    before = w.detach().clone()
    opt.step()
    s = torch.linalg.svdvals(before - w.detach())  # (16,)
    scale = 0.1 * (64 / 16) ** 0.5  # lr * torch.optim.Muon's "original" shape adjustment
    assert s.min() > 0.5 * scale and s.max() < 1.5 * scale, s / scale
    assert s.max() / s.min() < 3


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_bfloat16_muon_is_torch_optim_muon_bit_for_bit(adjust):
    """muon_step with Newton-Schulz in bfloat16 is torch.optim.Muon's update, over a few steps with
    Nesterov momentum, weight decay, a tall and a wide matrix."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 40))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, adjust_lr_fn=adjust)
    bias = [{"params": [torch.nn.Parameter(torch.zeros(4))], "name": "no_decay"}]  # AdamW's side
    opt = MuonAdamW(bias, [{"params": ours, "name": MUON_GROUP}], {"lr": 1e-3}, kw, ns_dtype="bfloat16")
    torch_opt = torch.optim.Muon(ref, **kw)
    for _ in range(3):
        for a, b in zip(ours, ref, strict=True):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def newton_schulz_fp32(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz (github.com/KellerJordan/Muon, zeropower_via_newtonschulz5;
    the coefficients torch.optim.Muon uses) written out in float32: the reference the auto rule must
    produce on a CPU without bf16 units."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g  # (k, n), k <= n
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T  # (k, k)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("bf16_units", [False, True])
def test_newton_schulz_runs_in_float32_where_bfloat16_is_emulated(monkeypatch, bf16_units):
    """muon_ns_dtype=auto on a CPU with bf16 units (as oneDNN reports them) gives torch.optim.Muon's
    bfloat16 update bit for bit; on one without, the float32 iteration, which differs from the bfloat16
    one by far more than float32 rounding. The update is measured on the weights, not read back from
    the optimizer's settings."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_units)
    model = tiny_model(family="gpt2")
    lr = 0.1
    kw = dict(lr=lr, momentum=0.0, nesterov=False, weight_decay=0.0)
    cfg = OptimSection(name="muon", muon_lr=lr, muon_momentum=0.0, muon_nesterov=False, muon_weight_decay=0.0)
    opt = build_optimizer(model, cfg)  # muon_ns_dtype=auto
    w = model.transformer.h[0].mlp.c_fc.weight  # (64, 16)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))  # (64, 16)
    ref = torch.nn.Parameter(w.detach().clone())
    ref.grad = w.grad.clone()
    torch.optim.Muon([ref], **kw).step()  # always bfloat16
    before = w.detach().clone()
    opt.step()
    fp32 = before - lr * (64 / 16) ** 0.5 * newton_schulz_fp32(w.grad)  # (64, 16)
    assert (ref.detach() - fp32).abs().max() > 1e-3  # the two dtypes are told apart
    if bf16_units:
        assert torch.equal(w.detach(), ref.detach())
    else:
        torch.testing.assert_close(w.detach(), fp32, rtol=0, atol=1e-5)
    opt = build_optimizer(model, OptimSection(name="muon", muon_ns_dtype="bfloat16"))  # an explicit choice wins
    assert opt.muon.param_groups[0]["ns_dtype"] == "bfloat16"


def test_every_group_follows_the_schedule_from_its_own_peak():
    cfg = Config()
    cfg.optim = OptimSection(name="muon", lr=1e-3, muon_lr=0.05, muon_momentum_warmup_steps=10)
    cfg.schedule.warmup_steps, cfg.schedule.name = 4, "cosine"
    opt = build_optimizer(tiny_model(tie_embeddings=False), cfg.optim)
    for step in (0, 3, 20, 60, 99):
        logged = apply_schedule(opt, step, cfg.optim, cfg.schedule, 100)
        by_name = {g["name"]: g for g in opt.param_groups}
        assert logged == by_name["decay"]["lr"] == by_name["no_decay"]["lr"] == lr_at(step, 1e-3, cfg.schedule, 100)
        assert by_name[MUON_GROUP]["lr"] == lr_at(step, 0.05, cfg.schedule, 100)
        assert by_name[MUON_GROUP]["lr"] / logged == pytest.approx(50)
        assert by_name[MUON_GROUP]["momentum"] == muon_momentum_at(step, cfg.optim)
    assert opt.muon.param_groups[0] is by_name[MUON_GROUP]  # the inner optimizer sees what the loop set


def test_muon_momentum_warmup():
    cfg = OptimSection(name="muon", muon_momentum_warmup_steps=300)  # modded-nanogpt: 0.85 -> 0.95 in 300 steps
    assert muon_momentum_at(0, cfg) == 0.85
    assert muon_momentum_at(150, cfg) == pytest.approx(0.90)
    assert muon_momentum_at(299, cfg) == pytest.approx(0.85 + 0.1 * 299 / 300)
    assert muon_momentum_at(300, cfg) == muon_momentum_at(5000, cfg) == 0.95
    off = OptimSection(name="muon")
    assert muon_momentum_at(0, off) == 0.95


def test_wsd_to_zero_is_modded_nanogpts_cooldown():
    """modded-nanogpt's get_lr: 1 until 1 - cooldown_frac of the run, then (1 - step/N) / cooldown_frac.
    schedule.name=wsd with min_lr_ratio=0 and no warmup is that schedule (docs/training.md)."""
    cfg = Config().schedule
    cfg.name, cfg.min_lr_ratio, cfg.warmup_steps, cfg.decay_frac = "wsd", 0.0, 0, 0.4
    n = 1000

    def modded(step: int) -> float:
        x = step / n
        return 1.0 if x < 1 - 0.4 else (1 - x) / 0.4

    for step in range(n):
        assert lr_at(step, 1.0, cfg, n) == pytest.approx(modded(step), abs=1e-12), step
    assert lr_at(n, 1.0, cfg, n) == 0.0


def test_muon_resumes_bit_exactly(data_dir, tmp_path):
    """2N steps straight == N steps, save, resume, N more: identical losses at every step (Muon's
    momentum buffers, AdamW's moments and the warmed-up momentum all come back)."""
    n = 3
    common = [*MUON, "schedule.total_steps=6", "optim.muon_momentum_warmup_steps=4", "schedule.warmup_steps=2"]
    ref = tmp_path / "ref"
    run(tiny_config(data_dir, ref, *common, f"train.max_steps={2 * n}"), **QUIET)
    split = tmp_path / "split"
    run(tiny_config(data_dir, split, *common, f"train.max_steps={n}"), **QUIET)
    run(tiny_config(data_dir, split, *common, f"train.max_steps={2 * n}"), **QUIET)  # resume: auto
    want, got = train_losses(ref), train_losses(split)
    assert sorted(got) == sorted(want) == list(range(1, 2 * n + 1))
    assert got == want  # bit for bit


def test_muon_lowers_the_loss_on_real_data(data_dir, tmp_path):
    steps = 30
    run(tiny_config(data_dir, tmp_path, *MUON, f"train.max_steps={steps}", "schedule.warmup_steps=5"), **QUIET)
    losses = train_losses(tmp_path)
    assert losses[1] > 5.0  # ~ln(257): the bytes vocabulary, untrained
    assert sum(losses[s] for s in range(steps - 4, steps + 1)) / 5 < losses[1] - 1.5, losses


def test_muon_alone_lowers_the_loss(data_dir, tmp_path):
    """AdamW's learning rate at 0 (embeddings, head, norms and biases frozen at their init): the loss
    falls only if Muon steps the blocks' matrices. With random frozen tied embeddings the floor is
    high, so the drop is smaller than the full optimizer's."""
    steps = 30
    over = ["optim.name=muon", "optim.muon_lr=0.05", "optim.lr=0", f"train.max_steps={steps}"]
    run(tiny_config(data_dir, tmp_path, *over, "schedule.warmup_steps=5"), **QUIET)
    losses = train_losses(tmp_path)
    assert losses[1] > 5.0  # ~ln(257): near-uniform predictions, whatever the batch
    assert sum(losses[s] for s in range(steps - 4, steps + 1)) / 5 < losses[1] - 0.2, losses


def test_deepspeed_refuses_muon_in_one_line(data_dir, tmp_path):
    """ZeRO flattens the parameters; DeepSpeed's own Muon (deepspeed/runtime/zero/muon) is configured
    through its JSON optimizer section, which config_builder.py refuses (the loop owns the optimizer)."""
    overrides = tiny_overrides(data_dir, tmp_path, "optim.name=muon", "parallel.strategy=deepspeed")
    proc = run_cli(["--config", str(DEBUG_YAML), *overrides])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "optim.name=muon is not supported under parallel.strategy=deepspeed: ZeRO flattens" in line
    assert "use parallel.strategy=ddp or fsdp" in line


def torchrun(nproc: int, data_dir, run_dir, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    args = ["--config", str(DEBUG_YAML), *tiny_overrides(data_dir, run_dir, *MUON, "schedule.total_steps=4", *extra)]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict[int, float]:
    """4 steps of Muon in one process (parallel.strategy=none)."""
    ref_dir = tmp_path_factory.mktemp("muon-ref")
    run(tiny_config(data_dir, ref_dir, *MUON, "train.max_steps=4", "schedule.total_steps=4"), **QUIET)
    return train_losses(ref_dir)


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert abs(got[step] - want[step]) < DIST_LOSS_TOL, (step, got[step], want[step])


@pytest.mark.slow
def test_ddp_two_ranks_run_muon_and_resume_in_one_process(data_dir, reference, tmp_path):
    """torchrun 2 ranks of DDP with Muon (gradients all-reduced, whole matrices on every rank) for 2
    steps and a checkpoint, then one process resumes it for 2 more: the losses of one process
    throughout (same global batch)."""
    torchrun(2, data_dir, tmp_path, "parallel.strategy=ddp", "train.max_steps=2", "checkpoint.every=2")
    args = tiny_overrides(data_dir, tmp_path, *MUON, "schedule.total_steps=4", "train.max_steps=4")
    second = run_cli(["--config", str(DEBUG_YAML), *args])
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    assert_same_losses(train_losses(tmp_path), reference)


@pytest.mark.slow
def test_fsdp_two_ranks_run_muon_and_resume_on_one_rank_then_in_one_process(data_dir, reference, tmp_path):
    """FSDP2 shards the matrices; the optimizer gathers each update for Newton-Schulz and keeps its
    rows. 2 ranks for 2 steps and a (DCP) checkpoint; 1 rank resumes it for a step; one process
    (parallel.strategy=none, through the strategy-neutral form) for the last: one process's losses."""
    torchrun(2, data_dir, tmp_path, "parallel.strategy=fsdp", "train.max_steps=2", "checkpoint.every=2")
    torchrun(1, data_dir, tmp_path, "parallel.strategy=fsdp", "train.max_steps=3")
    args = tiny_overrides(data_dir, tmp_path, *MUON, "schedule.total_steps=4", "train.max_steps=4")
    last = run_cli(["--config", str(DEBUG_YAML), *args])
    assert last.returncode == 0 and "resumed from" in last.stdout, last.stderr[-3000:]
    assert_same_losses(train_losses(tmp_path), reference)


def test_resuming_an_adamw_checkpoint_with_muon_says_what_to_do(data_dir, tmp_path):
    run(tiny_config(data_dir, tmp_path, "train.max_steps=1"), **QUIET)
    with pytest.raises(TrainError, match=r"optimizer state does not fit .*optim.name.*train.init_from="):
        run(tiny_config(data_dir, tmp_path, *MUON, "train.max_steps=2"), **QUIET)
