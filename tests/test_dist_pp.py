"""Pipeline parallel (train/parallel/pipeline.py) against one process.

One torchrun launch of 2 ranks (gloo) runs this file as its worker: pp 2 with 1F1B (GPT-2 family,
tied head, document mask) and with interleaved 1F1B (2 stages per rank, modern family), 4 gradient-
accumulation micro-batches per step. The reference is the same model, batches and optimizer in one
process (the loop's accumulation: backward of each micro-batch's loss / 4), in the pytest process.
Checked: the per-step losses and the gradients' global norm, the forward-only evaluation loss and
greedy KV-cache decoding through PipelineModel, and which parameters each rank holds.

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/test_dist_pp.py SPEC.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.loss import mean_loss

REPO = Path(__file__).resolve().parents[1]
SEQ, VOCAB, EOT, ACCUM, MICRO, STEPS = 16, 97, 3, 4, 2, 4
PROMPT, NEW_TOKENS = [5, 17, 42, 8], 6
# fp32; the pipeline changes only where partial sums meet (the norm's per-stage sums), measured
# well below this on the losses after 4 AdamW steps
TOL = 1e-5

CONFIGS = {
    # learned positions + the document mask: every stage rebuilds the mask from the ids it is handed
    # and GPT-2's tied head: the token table on both the first and the last stage
    "gpt2": dict(n_layer=4, n_head=4, n_embd=32, tie_embeddings=True, doc_mask=True, eot_id=EOT),
    "modern": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=32, family="modern", bias=False, tie_embeddings=False),
}
SCENARIOS = {
    "1f1b": {"config": "gpt2", "schedule": "1F1B", "stages_per_rank": 1},
    "interleaved": {"config": "modern", "schedule": "Interleaved1F1B", "stages_per_rank": 2},
}


def model_config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, block_size=SEQ, **CONFIGS[name])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (ACCUM * MICRO, SEQ) batch of a step, the same in every process; every 7th id is an EOT."""
    g = torch.Generator().manual_seed(100 + step)
    seq = torch.randint(0, VOCAB, (ACCUM * MICRO, SEQ + 1), generator=g)
    seq[seq % 7 == 0] = EOT
    return seq[:, :-1], seq[:, 1:]


def micro_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = batch(step)
    return [(x[i * MICRO : (i + 1) * MICRO], y[i * MICRO : (i + 1) * MICRO]) for i in range(ACCUM)]


def build_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in module.parameters() if p.dim() >= 2]
    rest = [p for p in module.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-6, foreach=False)


def reference(name: str) -> dict:
    """One process: the loop's gradient accumulation over the same micro-batches."""
    torch.manual_seed(0)
    model = GPT(model_config(name))
    opt = build_optimizer(model)
    res: dict = {"losses": [], "norms": []}
    for step in range(1, STEPS + 1):
        total = 0.0
        for x, y in micro_batches(step):
            loss = model(x, y)
            (loss / ACCUM).backward()
            total += loss.item()
        res["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        res["losses"].append(total / ACCUM)
    x, y = batch(STEPS + 1)
    res["eval"] = mean_loss(model, [(x, y)])
    from train.sample import generate

    res["greedy"] = generate(model, PROMPT, NEW_TOKENS, temperature=0)
    res["names"] = sorted(model.state_dict())
    return res


def worker(spec_path: str) -> None:
    """One pp rank: every scenario in SCENARIOS, in one process group; rank 0 writes the results."""
    import torch.distributed as dist

    from train.parallel import pipeline as pp
    from train.sample import generate

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group, rank = dist.group.WORLD, dist.get_rank()
    results = {}
    for name, sc in SCENARIOS.items():
        torch.manual_seed(0)  # every rank builds the reference's whole model, then keeps its stages
        stages = pp.split_stages(GPT(model_config(sc["config"])), rank, 2, sc["stages_per_rank"])
        pp.sync_tied_weights(stages, group)
        local = pp.merge_stages(stages)
        opt = build_optimizer(local)
        schedule = pp.build_schedule(stages, group, ACCUM, sc["schedule"], torch.device("cpu"))
        res: dict = {"losses": [], "norms": []}
        for step in range(1, STEPS + 1):
            loss = pp.pipeline_step(schedule, micro_batches(step), group)
            pp.sync_tied_grads(stages, group)
            res["norms"].append(float(pp.clip_grad_norm_(stages, 1.0, group)))
            opt.step()
            opt.zero_grad(set_to_none=True)
            res["losses"].append(float(loss))
        view = pp.PipelineModel(stages, group)
        x, y = batch(STEPS + 1)
        res["eval"] = mean_loss(view, [(x, y)])  # every rank gets the broadcast loss
        res["greedy"] = generate(view, PROMPT, NEW_TOKENS, temperature=0)
        per_rank = [None, None]
        mine = {"names": sorted(local.state_dict()), "params": sum(p.numel() for p in local.parameters())}
        if "wte" in local.transformer:  # the tied copies, equal after the steps
            mine["table"] = local.transformer.wte.weight.detach().flatten().tolist()
        dist.all_gather_object(per_rank, mine)
        everyone = [None, None]
        dist.all_gather_object(everyone, {k: res[k] for k in ("losses", "eval", "greedy")})
        res["ranks"], res["all_ranks"] = per_rank, everyone
        results[name] = res
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("pp")
    spec = work / "spec.json"
    spec.write_text(json.dumps({"out": str(work / "out.json")}))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", __file__, str(spec)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((work / "out.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_pipeline_matches_one_process(pp_run, name):
    got, ref = pp_run[name], reference(SCENARIOS[name]["config"])
    assert got["losses"] == pytest.approx(ref["losses"], abs=TOL)
    assert got["norms"] == pytest.approx(ref["norms"], rel=TOL)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains: the comparison is not between constants
    # forward-only: the evaluation loss and greedy decoding with the KV cache, valid on every rank
    assert got["eval"] == pytest.approx(ref["eval"], abs=TOL)
    assert got["greedy"] == ref["greedy"]
    other = got["all_ranks"][1]
    assert other["losses"] == got["losses"] and other["eval"] == got["eval"] and other["greedy"] == got["greedy"]


@pytest.mark.slow
def test_each_rank_holds_only_its_stages(pp_run):
    """1F1B: rank 0 = embeddings + blocks 0-1, rank 1 = blocks 2-3 + final norm + head, whose tied weight
    is the token table under its bare name. Interleaved (stages r, r + 2 on rank r, untied): rank 0 =
    embeddings + blocks 0 and 2, rank 1 = blocks 1 and 3 + head. Together exactly the bare model's names
    (the DCP keys); only the tied table on both ranks, and its two copies equal after 4 steps."""
    expect = {
        "1f1b": ({0, 1}, {2, 3}, {"transformer.wte.weight", "transformer.wpe.weight"}),
        "interleaved": ({0, 2}, {1, 3}, {"transformer.wte.weight"}),
    }
    for name, (blocks0, blocks1, embeddings) in expect.items():
        ranks = pp_run[name]["ranks"]
        r0, r1 = (set(r["names"]) for r in ranks)
        model = GPT(model_config(SCENARIOS[name]["config"]))
        tied = model.config.tie_embeddings
        assert r0 | r1 == set(model.state_dict())
        assert r0 & r1 == ({"transformer.wte.weight"} if tied else set())
        assert {int(k.split(".")[2]) for k in r0 if k.startswith("transformer.h.")} == blocks0
        assert {int(k.split(".")[2]) for k in r1 if k.startswith("transformer.h.")} == blocks1
        assert embeddings <= r0 and "lm_head.weight" in r1 and "transformer.ln_f.weight" in r1
        n0, n1 = (r["params"] for r in ranks)
        copy = model.transformer.wte.weight.numel() if tied else 0
        assert n0 + n1 == sum(p.numel() for p in model.parameters()) + copy and max(n0, n1) < n0 + n1 - copy
        if tied:
            assert ranks[0]["table"] == ranks[1]["table"]


def reference_names(name: str) -> list[str]:
    return sorted(GPT(model_config(name)).state_dict())


def test_stages_in_one_process_are_the_model():
    """The stages run in order in one process give GPT.forward's logits exactly (no communication)."""
    from train.parallel import pipeline as pp

    for name in CONFIGS:
        torch.manual_seed(0)
        model = GPT(model_config(name))
        x, _ = batch(1)
        want = model(x)
        stages = [s for r in range(2) for s in pp.split_stages(model, r, 2, 2)]
        h = x
        for stage in sorted(stages, key=lambda s: s.stage_index):
            h = stage(h, tokens=x)
        assert torch.equal(h, want)


def test_layouts_the_pipeline_refuses():
    from train.parallel import pipeline as pp

    tied = GPT(ModelConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=16))
    last = pp.split_stages(tied, 1, 2)[0]  # a tied head is the token table, under the table's name
    assert last.lm_head.weight is last.transformer.wte.weight is tied.transformer.wte.weight
    with pytest.raises(ValueError, match="n_layer=4 is fewer than the 6 pipeline stages"):
        pp.split_stages(GPT(model_config("modern")), 0, 3, 2)
    with pytest.raises(ValueError, match="must be a multiple of parallel.pp=2"):
        pp.check_schedule("Interleaved1F1B", 2, 2, 3)
    with pytest.raises(ValueError, match="must be a multiple of parallel.pp=4"):
        pp.check_schedule("1F1B", 4, 1, 2)
    with pytest.raises(ValueError, match="use one of 1F1B, Interleaved1F1B"):
        pp.check_schedule("GPipe", 2, 1, 2)
    # an uneven split: the first stages take the extra blocks, every block exactly once
    assert [list(pp.stage_blocks(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


# ----------------------------------------------------------------------------- through `python -m train`

HELLASWAG = REPO / "tests" / "fixtures" / "hellaswag_mini.jsonl"
PP_RUN = [
    "model.tie_embeddings=true",  # GPT-2's tied head: the table on the first and on the last stage
    "train.eval_every=2",
    "logging.sample_every=2",
    "eval.hellaswag_every=2",
    f"eval.hellaswag_data={HELLASWAG}",
]
KEYS = ("loss", "val_loss", "sample", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n")


def torchrun_train(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    from train_helpers import python_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"]
    return subprocess.run(cmd + args, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=600)


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    from train_helpers import DEBUG_YAML, tiny_overrides

    return ["--config", str(DEBUG_YAML), *tiny_overrides(data, run_dir, *PP_RUN, *extra)]


def records(run_dir: Path) -> dict[str, dict[int, object]]:
    from train_helpers import metrics

    rows = metrics(run_dir)
    return {key: {r["step"]: r[key] for r in rows if key in r} for key in KEYS}


@pytest.fixture(scope="module")
def train_ref(tmp_path_factory) -> tuple[Path, dict]:
    """One process, 4 steps of 2 accumulation micro-batches; val loss, a sample and HellaSwag (the 12
    examples of tests/fixtures) every 2 steps."""
    from train_helpers import prepared_dataset, run_cli

    data, run = prepared_dataset(tmp_path_factory), tmp_path_factory.mktemp("pp_ref")
    proc = run_cli(train_args(data, run, "train.max_steps=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, records(run)


def assert_same_run(got: dict, want: dict) -> None:
    assert sorted(got["loss"]) == sorted(want["loss"]) == [1, 2, 3, 4]
    for key in ("loss", "val_loss"):
        for step, value in want[key].items():
            assert got[key][step] == pytest.approx(value, abs=TOL), (key, step)
    # the sampler's and HellaSwag's logits come through the pipeline; each example is scored once
    assert got["sample"] == want["sample"]
    assert sorted(got["hellaswag_n"]) == sorted(want["hellaswag_n"]) == [0, 2, 4]
    for key in ("hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n"):
        assert got[key] == want[key], key
    assert set(want["hellaswag_n"].values()) == {12}


@pytest.mark.slow
def test_pp2_under_train_matches_one_process_and_resumes_across_layouts(train_ref, tmp_path):
    """`torchrun -m train parallel.pp=2` (1F1B over the loop's 2 micro-batches) saves at step 2 and one
    process resumes it; one process saves at step 2 and pp 2 resumes it: both equal the uninterrupted
    one-process run (losses, val losses, samples, HellaSwag) -- the DCP checkpoints carry the bare names."""
    from train_helpers import run_cli

    data, want = train_ref
    a, b = tmp_path / "pp_then_one", tmp_path / "one_then_pp"
    first = torchrun_train(2, train_args(data, a, "train.max_steps=2", "checkpoint.every=2", "parallel.pp=2"))
    assert first.returncode == 0, f"{first.stdout[-2000:]}\n{first.stderr[-4000:]}"
    second = run_cli(train_args(data, a, "train.max_steps=4"))
    assert second.returncode == 0 and "resumed from" in second.stdout + second.stderr, second.stderr[-3000:]
    assert_same_run(records(a), want)

    first = run_cli(train_args(data, b, "train.max_steps=2", "checkpoint.every=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun_train(2, train_args(data, b, "train.max_steps=4", "parallel.pp=2"))
    assert second.returncode == 0, f"{second.stdout[-2000:]}\n{second.stderr[-4000:]}"
    assert "resumed from" in second.stdout + second.stderr
    assert_same_run(records(b), want)


@pytest.mark.slow
def test_pp2_x_dp2_under_train_matches_one_process(train_ref, tmp_path):
    """4 ranks: 2 stages, each sharded by FSDP over 2 data-parallel ranks (2 micro-batches of 2 rows).
    The final checkpoint's model/ (full weights gathered from both stages) equals what train.consolidate
    reads from its DCP shards in one process: the shards carry every bare name once."""
    from safetensors.torch import load_file
    from train_helpers import python_env

    data, want = train_ref
    run = tmp_path / "pp_dp"
    args = train_args(data, run, "train.max_steps=4", "train.micro_batch=2", "parallel.pp=2", "parallel.dp_shard=2")
    proc = torchrun_train(4, [*args, "checkpoint.every=4"])
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert_same_run(records(run), want)
    ckpt, out = run / "checkpoints" / "step_000004", tmp_path / "consolidated"
    cmd = [sys.executable, "-m", "train.consolidate", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered, consolidated = load_file(ckpt / "model" / "model.safetensors"), load_file(out / "model.safetensors")
    bare = GPT(ModelConfig(vocab_size=257, block_size=32, n_layer=2, n_head=4, n_embd=64, tie_embeddings=True))
    names = sorted(k for k in bare.state_dict() if k != "lm_head.weight")  # a tied head is saved as the table
    assert sorted(gathered) == sorted(consolidated) == names
    assert all(torch.equal(gathered[k], consolidated[k]) for k in gathered)


def test_pipeline_user_errors_are_one_line(tmp_path_factory, tmp_path):
    """Fewer blocks than stages: the config check, before any process starts; a schedule the micro-batches
    cannot fill: the strategy, before its process group."""
    from train_helpers import DEBUG_YAML, prepared_dataset, run_cli, tiny_overrides

    from train.parallel.dims import ParallelDims
    from train.parallel.pipeline_strategy import PipelineStrategy
    from train.parallel.world import StrategyError
    from train.strategy import StrategySpec

    data = prepared_dataset(tmp_path_factory)
    overrides = tiny_overrides(data, tmp_path / "r", "parallel.pp=2", "model.n_layer=1")
    proc = run_cli(["--config", str(DEBUG_YAML), *overrides])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("lower them or add layers"), proc.stderr
    dims = ParallelDims(pp=2, world_size=2, pp_stages_per_rank=2)
    with pytest.raises(StrategyError, match="grad_accum_steps=3 .* must be a multiple of parallel.pp=2"):
        PipelineStrategy(dims, "cpu", StrategySpec(grad_accum_steps=3), schedule="Interleaved1F1B")


if __name__ == "__main__":
    worker(sys.argv[1])
