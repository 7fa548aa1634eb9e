"""Elastic and portable checkpoints (docs/checkpoints.md): a checkpoint continues under another world
size, ZeRO stage or strategy, through the strategy-neutral form (train/portable.py).

Three torchrun launches (tests/dist_driver.py, CPU, gloo, fp32, the tiny GPT):
    two ranks   save at step 3 under ZeRO-2, ZeRO-3, FSDP and DDP (each runs on to step 6: the
                uninterrupted run), then resume ZeRO-3 -> FSDP, FSDP -> ZeRO-1, DDP -> ZeRO-3
    one rank    ZeRO-2 (2 ranks) -> ZeRO-2 (1 rank), SIGKILLed in the middle of the conversion
                (GPTRAIN_FAULT=convert@3): the checkpoint is untouched
    one rank    the same resume again: it converts again and continues
Every resumed run continues the one-process reference's losses within LOSS_TOL at steps 4-6.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import dist_driver as drv
import pytest
import torch
from conftest import require_extra

from train.portable import Portable

require_extra("deepspeed", "deepspeed")
pytestmark = pytest.mark.slow

# fp32: another world size or strategy changes only the floating-point reduction order. Stated
# tolerance: 1e-5 absolute on losses of ~4.6 (about 2e-6 relative); docs/checkpoints.md.
LOSS_TOL = 1e-5
STEPS, SAVE_AT = 6, 3
SOURCES = {"z2": {"zero_stage": 2}, "z3": {"zero_stage": 3}}


def ckpt(work: Path, run: str) -> str:
    return str(work / run / "checkpoints" / f"step_{SAVE_AT:06d}")


def digest(root: Path) -> str:
    """Every file's path and bytes under root: a checkpoint is only ever read."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elastic")


@pytest.fixture(scope="module")
def ref(work) -> dict:
    (work / "out").mkdir()
    return drv.run_scenario({"name": "ref", "strategy": "none", "steps": STEPS}, work / "out")


def _launch(work: Path, name: str, nproc: int, scenarios: list[dict], **kw):
    spec = {"out": str(work / "out"), "driver_group": True, "scenarios": scenarios}
    return drv.launch(spec, nproc, work / f"{name}.json", **kw)


def _ok(proc) -> None:
    first = max(0, proc.stderr.find("Traceback"))  # a rank's own traceback, before torchrun's summary
    assert proc.returncode == 0, (
        f"torchrun exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[first : first + 6000]}"
    )


@pytest.fixture(scope="module")
def two_ranks(work, ref) -> Path:
    fresh = {"steps": STEPS, "seed": 5}  # resumed runs start from other weights: only load() can make them match

    def saver(name, strategy, **options):
        return {
            "name": name,
            "strategy": strategy,
            "steps": STEPS,
            "options": options,
            "save_at": SAVE_AT,
            "save_dir": str(work / f"run_{name}"),
            "save_model": strategy != "fsdp",  # FSDP's weights only in its DCP shards
        }

    scenarios = [
        saver("z2", "deepspeed", zero_stage=2),
        saver("z3", "deepspeed", zero_stage=3),
        saver("fsdp", "fsdp"),
        saver("ddp", "ddp"),
        {"name": "z3_to_fsdp", "strategy": "fsdp", "load": ckpt(work, "run_z3"), **fresh},
        {
            "name": "fsdp_to_z1",
            "strategy": "deepspeed",
            "options": {"zero_stage": 1},
            "load": ckpt(work, "run_fsdp"),
            **fresh,
        },
        {
            "name": "ddp_to_z3",
            "strategy": "deepspeed",
            "options": {"zero_stage": 3},
            "load": ckpt(work, "run_ddp"),
            **fresh,
        },
    ]
    _ok(_launch(work, "two_ranks", 2, scenarios))
    return work / "out"


@pytest.fixture(scope="module")
def killed_then_resumed(work, two_ranks) -> dict:
    src = Path(ckpt(work, "run_z2"))
    before = digest(src)
    sc = {"strategy": "deepspeed", "options": {"zero_stage": 2}, "load": str(src), "steps": STEPS, "seed": 5}
    killed = _launch(
        work, "killed", 1, [{"name": "z2_to_1_killed", **sc}], extra_env={"GPTRAIN_FAULT": f"convert@{SAVE_AT}"}
    )
    left = sorted(p.name for p in src.parent.iterdir() if "convert" in p.name)
    after_kill = digest(src)
    resumed = _launch(work, "resumed", 1, [{"name": "z2_to_1", **sc}])
    return {
        "killed": killed,
        "resumed": resumed,
        "left": left,
        "unchanged": before == after_kill == digest(src),
        "after": sorted(p.name for p in src.parent.iterdir() if "convert" in p.name),
    }


def assert_continues(out: Path, name: str, ref: dict) -> float:
    """The resumed run's losses at steps SAVE_AT+1..STEPS against the one-process reference; returns the
    largest difference (printed: the figure docs/checkpoints.md states)."""
    res = drv.load_result(out, name)
    assert res["loaded_step"] == SAVE_AT and res["extra_roundtrip"]
    steps = list(range(SAVE_AT + 1, STEPS + 1))
    assert sorted(res["losses"]) == steps
    diffs = [abs(res["losses"][k] - ref["losses"][k]) for k in steps]
    print(f"{name}: max |loss - reference| over steps {steps} = {max(diffs):.2e}")
    assert max(diffs) < LOSS_TOL, (name, diffs)
    return max(diffs)


def test_sources_match_the_reference(two_ranks, ref):
    """The uninterrupted runs that wrote the checkpoints are the reference run (the premise)."""
    for name in ("z2", "z3", "fsdp", "ddp"):
        res = drv.load_result(two_ranks, name)
        assert max(abs(res["losses"][k] - ref["losses"][k]) for k in range(1, STEPS + 1)) < LOSS_TOL, name


@pytest.mark.parametrize("name", ["z3_to_fsdp", "fsdp_to_z1", "ddp_to_z3"])
def test_another_strategy_continues_the_run(two_ranks, ref, name):
    assert_continues(two_ranks, name, ref)


def test_zero2_on_two_ranks_continues_on_one_after_a_kill_during_conversion(killed_then_resumed, work, ref):
    k = killed_then_resumed
    assert k["killed"].returncode != 0  # SIGKILLed by the hook
    assert k["left"] and all(n.startswith("..convert-") for n in k["left"])  # only a temporary directory
    assert k["unchanged"]  # the saved checkpoint is byte-for-byte what it was
    _ok(k["resumed"])
    assert k["after"] == []  # the resume removed the leftover and its own conversion
    assert_continues(work / "out", "z2_to_1", ref)


def test_neutral_forms_of_every_strategy_agree(two_ranks, work, tmp_path):
    """`python -m train.consolidate CKPT --neutral OUT` from the four checkpoints of the same step:
    the same weights, optimizer state and groups, whichever strategy and layout wrote them."""
    from train.consolidate import main

    forms = {}
    for name in ("ddp", "fsdp", "z2", "z3"):
        out = tmp_path / name
        assert main([ckpt(work, f"run_{name}"), "--neutral", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["neutral.json", "optimizer.safetensors", "weights.safetensors"]
        forms[name] = Portable.load(out)
    want = forms["ddp"]
    saved = torch.load(two_ranks / "ddp.saved_sd.pt")
    assert sorted(want.params) == sorted(k for k in saved if k != "lm_head.weight")  # tied: the table once
    for k, v in want.params.items():
        assert torch.equal(v, saved[k]), k
    assert want.step == SAVE_AT
    for name, got in forms.items():
        assert sorted(got.params) == sorted(want.params), name
        assert [g["params"] for g in got.param_groups] == [g["params"] for g in want.param_groups], name
        assert [g["weight_decay"] for g in got.param_groups] == [0.1, 0.0], name
        for n in want.params:
            torch.testing.assert_close(got.params[n], want.params[n], atol=1e-5, rtol=0, msg=f"{name} {n}")
            assert sorted(got.state[n]) == ["exp_avg", "exp_avg_sq", "step"], (name, n)
            assert float(got.state[n]["step"]) == SAVE_AT
            for key in ("exp_avg", "exp_avg_sq"):  # agree to ~5e-7 of the tensor's largest entry (measured)
                scale = float(want.state[n][key].abs().max())
                torch.testing.assert_close(
                    got.state[n][key], want.state[n][key], atol=1e-5 * scale, rtol=0, msg=f"{name} {n} {key}"
                )


def test_neutral_form_is_generic_over_optimizer_state_keys(tmp_path):
    """SGD with momentum keeps `momentum_buffer` (as Muon does), not Adam's moments: the neutral form
    carries whatever keys the optimizer has, and load_portable restores them by name."""
    from model.gpt import GPT
    from train.checkpoint import CheckpointManager, TrainState
    from train.parallel.build import make_strategy
    from train.portable import from_checkpoint
    from train.strategy import StrategySpec

    def sgd(module):
        return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)

    mcfg = drv.model_config()
    s = make_strategy("none", torch.device("cpu"), StrategySpec())
    torch.manual_seed(0)
    model, opt = s.wrap(GPT(mcfg), sgd)
    x, y = drv.global_batch(1)
    for _ in range(2):
        s.backward(model(x, y))
        s.clip_and_step()
        s.zero_grad()
    state = TrainState(step=2, strategy="none", model_config=mcfg.to_dict())
    ckpt = CheckpointManager(tmp_path / "run", s, mcfg, keep_last=0).save(state)
    (tmp_path / "work").mkdir()
    saved = TrainState.from_dict(torch.load(ckpt / "train_state.pt", weights_only=True), ckpt)
    p = from_checkpoint(ckpt, ckpt / "state", saved, tmp_path / "work")
    p.save(tmp_path / "work")
    p = Portable.load(tmp_path / "work")
    names = dict(model.named_parameters())
    assert set(p.state) == set(names) and all(set(st) == {"momentum_buffer"} for st in p.state.values())

    fresh = make_strategy("none", torch.device("cpu"), StrategySpec())
    torch.manual_seed(1)
    model2, opt2 = fresh.wrap(GPT(mcfg), sgd)
    fresh.load_portable(p)
    for n, q in model2.named_parameters():
        assert torch.equal(q, names[n]), n
        assert torch.equal(opt2.state[q]["momentum_buffer"], opt.state[names[n]]["momentum_buffer"]), n


def test_an_earlier_none_checkpoint_resumes_through_the_neutral_form(tmp_path):
    """The format that none / ddp wrote before every layout saved DCP shards (an empty state/, the
    index-keyed optimizer state and its parameter names in train_state.pt) resumes, by name."""
    import shutil

    from model.gpt import GPT
    from train.checkpoint import CheckpointManager, TrainState
    from train.parallel.build import make_strategy
    from train.strategy import StrategySpec

    mcfg = drv.model_config()
    s = make_strategy("none", torch.device("cpu"), StrategySpec())
    torch.manual_seed(0)
    model, opt = s.wrap(GPT(mcfg), drv.build_optimizer)
    x, y = drv.global_batch(1)
    s.backward(model(x, y))
    s.clip_and_step()
    ckpt = CheckpointManager(tmp_path / "run", s, mcfg, keep_last=0).save(
        TrainState(step=1, strategy="none", model_config=mcfg.to_dict())
    )
    # rewrite it in the earlier format
    names = {id(p): n for n, p in model.named_parameters()}
    raw = torch.load(ckpt / "train_state.pt", weights_only=True)
    raw["strategy_state"] = {
        "optimizer": opt.state_dict(),
        "param_names": [[names[id(p)] for p in g["params"]] for g in opt.param_groups],
    }
    torch.save(raw, ckpt / "train_state.pt")
    shutil.rmtree(ckpt / "state")
    (ckpt / "state").mkdir()

    fresh = make_strategy("none", torch.device("cpu"), StrategySpec())
    torch.manual_seed(1)
    model2, opt2 = fresh.wrap(GPT(mcfg), drv.build_optimizer)
    CheckpointManager(tmp_path / "run", fresh, mcfg, keep_last=0).load(ckpt)
    want = dict(model.named_parameters())
    for n, q in model2.named_parameters():
        assert torch.equal(q, want[n]), n
        assert torch.equal(opt2.state[q]["exp_avg_sq"], opt.state[want[n]]["exp_avg_sq"]), n
