"""Pipeline parallel composed with tensor parallel, Muon and exact resume under pp, and the q/k norm
under tensor parallel, against one process (CPU, gloo).

One torchrun launch of 4 ranks runs tests/dist_driver.py's loop sequence over these scenarios:
    pp 2 x tp 2   1F1B (modern family: RoPE, GQA, SwiGLU), checkpointed at step 2; then resumed
                  from that checkpoint on the same mesh; interleaved 1F1B (GPT-2 family, untied,
                  2 stages per rank); Muon
    pp 2 x cp 2   1F1B with the document mask, each stage attending over the cp group's keys
    dp_shard 2 x tp 2   the modern family with qk_norm
    dp_shard 2 x cp 2   with dropout, checkpointed at step 2 and resumed on the same mesh
Each is compared with the same model, batches and optimizer in one process (the pytest process);
then pp 2 x tp 2's forward-only view (evaluation's logits and loss) with the one-process model.
A second launch of 8 ranks runs the three dimensions together: pp 2 x tp 2 x cp 2 with the document
mask (each stage's blocks see T / (cp tp) tokens; attention all-gathers keys and values over cp).

    python -m torch.distributed.run --nproc_per_node=4 --standalone tests/test_dist_pp_tp.py SPEC.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dist_driver as drv
import pytest
import torch
from train_helpers import python_env

from model.config import ModelConfig
from model.gpt import GPT

# fp32; the layouts differ from one process only in where partial sums meet (reduction order)
LOSS_TOL = 1e-5
STEPS = 4
ACCUM = 2  # the pipeline's micro-batches (a multiple of pp)
C = 64  # dist_driver's n_embd
CP = {"strategy": "none", "options": {"dp_shard": 2, "cp": 2}, "steps": STEPS}
PP_TP = {"strategy": "none", "options": {"pp": 2, "tp": 2}, "accum": ACCUM, "steps": STEPS}


def model_config(family: str = "gpt2") -> ModelConfig:
    """dist_driver's families, and those that only these layouts need."""
    if family == "qk_norm":
        return ModelConfig(**{**drv_config("modern").to_dict(), "qk_norm": True})
    if family == "doc_mask":  # context parallel's window: positions and the document mask per cp rank
        return ModelConfig(**{**drv_config("modern").to_dict(), "doc_mask": True, "eot_id": 3})
    if family == "dropout":
        return ModelConfig(**{**drv_config("modern").to_dict(), "dropout": 0.2})
    if family == "gpt2_tied":  # 4 blocks: 2 stages per pp rank; the tied table on the first and last stage
        return ModelConfig(**{**drv_config("gpt2").to_dict(), "n_layer": 4, "tie_embeddings": True})
    return drv_config(family)


drv_config = drv.model_config
drv.model_config = model_config  # run_scenario builds the model of sc["family"] through this name


def scenarios(work: Path) -> list[dict]:
    ckpt = work / "run_pp_tp"
    return [
        {"name": "pp_tp", "family": "modern", **PP_TP, "save_at": 2, "save_dir": str(ckpt), "record_layout": True},
        {"name": "pp_tp_resumed", "family": "modern", **PP_TP, "load": str(ckpt / "checkpoints" / "step_000002")},
        {
            "name": "pp_tp_interleaved",
            "family": "gpt2_tied",
            **PP_TP,
            "options": {"pp": 2, "tp": 2, "pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2},
        },
        {"name": "pp_tp_muon", "family": "modern", "optim": "muon", **PP_TP},
        {"name": "pp_cp", "family": "doc_mask", **PP_TP, "options": {"pp": 2, "cp": 2}, "record_layout": True},
        {"name": "cp_dropout", "family": "dropout", **CP, "save_at": 2, "save_dir": str(work / "run_cp")},
        {
            "name": "cp_dropout_resumed",
            "family": "dropout",
            **CP,
            "load": str(work / "run_cp" / "checkpoints" / "step_000002"),
        },
        {
            "name": "tp_qk_norm",
            "family": "qk_norm",
            "strategy": "none",
            "options": {"dp_shard": 2, "tp": 2},
            "steps": STEPS,
            "record_layout": True,
        },
    ]


# the 8-rank launch: the three dimensions at once
PP_TP_CP = {
    "name": "pp_tp_cp",
    "family": "doc_mask",
    **PP_TP,
    "options": {"pp": 2, "tp": 2, "cp": 2},
    "steps": 2,  # 8 processes on the CPU: the first step's forward and backward, and one after an update
    "record_layout": True,
}

REFERENCES = {  # scenario -> (family, optimizer, accumulation) of its one-process reference
    "pp_tp": ("modern", None, ACCUM),
    "pp_tp_interleaved": ("gpt2_tied", None, ACCUM),
    "pp_tp_muon": ("modern", "muon", ACCUM),
    "pp_cp": ("doc_mask", None, ACCUM),
    "tp_qk_norm": ("qk_norm", None, 1),
    "pp_tp_cp": ("doc_mask", None, ACCUM),
}


def launch(work: Path, nproc: int, scenarios: list[dict], forward: bool) -> Path:
    """One torchrun of this file: checkpoints in work/run_*/, the results (and the references' beside
    them) in work/out/; forward: then the forward-only view of pp 2 x tp 2 (4 ranks)."""
    out = work / "out"
    out.mkdir()
    spec = work / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "scenarios": scenarios, "forward_only": forward}))
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd = [*torchrun, __file__, str(spec)]
    proc = subprocess.run(cmd, env=python_env(), cwd=drv.REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("pp_tp")
    return launch(work, 4, scenarios(work), forward=True)


@pytest.fixture(scope="module")
def eight_ranks(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("pp_tp_cp"), 8, [PP_TP_CP], forward=False)


def reference(out: Path, name: str, steps: int = STEPS) -> dict:
    family, optim, accum = REFERENCES[name]
    sc = {"name": f"ref_{name}", "strategy": "none", "steps": steps, "family": family, "accum": accum}
    return drv.run_scenario({**sc, "optim": optim} if optim else sc, out)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in REFERENCES if n != "pp_tp_cp"])
def test_layout_matches_one_process(four_ranks, name):
    matches_one_process(four_ranks, name)


@pytest.mark.slow
def test_pp_tp_cp_matches_one_process_and_applies_each_dimension(eight_ranks):
    """pp 2 x tp 2 x cp 2 (8 ranks) against one process; rank 0 (pp 0, cp 0, tp 0) holds stage 0 only,
    with half the heads, and its block sees (micro-batch, T / (cp tp), C): its cp rank's chunks of each
    window, then its tp rank's slice of those (sequence parallel)."""
    matches_one_process(eight_ranks, "pp_tp_cp", steps=PP_TP_CP["steps"])
    got, cfg = drv.load_result(eight_ranks, "pp_tp_cp"), model_config("doc_mask")
    assert got["world_size"] == 8
    assert got["layout"]["heads"] == [[cfg.n_head // 2, cfg.n_kv_head // 2]]
    assert "lm_head.weight" not in got["layout"] and "transformer.h.1.attn.c_attn.weight" not in got["layout"]
    micro = drv.GLOBAL_BATCH // ACCUM
    assert got["block_input"] and all(s == [micro, drv.SEQ // (2 * 2), C] for s in got["block_input"]), got[
        "block_input"
    ]


def matches_one_process(out: Path, name: str, steps: int = STEPS) -> None:
    """The layout's losses and gradient norms of every step, and its final weights, are the one-process
    reference's (built here, in the pytest process)."""
    got, want = drv.load_result(out, name), reference(out, name, steps)
    assert sorted(got["losses"]) == list(range(1, steps + 1))
    for step in want["losses"]:
        assert got["losses"][step] == pytest.approx(want["losses"][step], abs=LOSS_TOL), step
        assert got["norms"][step] == pytest.approx(want["norms"][step], rel=LOSS_TOL), step
    # the final weights, gathered from every stage and tp shard, are the reference's, which moved away
    # from the initial ones (the comparison is not between untrained models)
    final, ref_final = (torch.load(out / f"{n}.final.pt") for n in (name, f"ref_{name}"))
    torch.manual_seed(0)
    initial = GPT(model_config(REFERENCES[name][0])).state_dict()
    assert sorted(final) == sorted(ref_final) == sorted(initial)
    for k in final:
        torch.testing.assert_close(final[k], ref_final[k], atol=1e-5, rtol=1e-4, msg=k)
    assert all(not torch.equal(ref_final[k], initial[k]) for k in final if k.endswith(".weight"))


@pytest.mark.slow
def test_pipeline_resume_on_the_same_mesh_is_exact(four_ranks):
    """pp 2 x tp 2 resumed from its step-2 DCP checkpoint: steps 3 and 4 bit-identical to the
    uninterrupted run."""
    full, resumed = (drv.load_result(four_ranks, n) for n in ("pp_tp", "pp_tp_resumed"))
    assert resumed["loaded_step"] == 2 and resumed["extra_roundtrip"]
    assert sorted(resumed["losses"]) == [3, 4]
    for step in (3, 4):
        assert resumed["losses"][step] == full["losses"][step]
        assert resumed["norms"][step] == full["norms"][step]


@pytest.mark.slow
def test_cp_is_applied_inside_the_pipeline(four_ranks):
    """pp 2 x cp 2: rank 0's block sees its cp rank's half of each window, (micro-batch, T / 2, C)."""
    seen = drv.load_result(four_ranks, "pp_cp")["block_input"]
    micro = drv.GLOBAL_BATCH // ACCUM
    assert seen and all(shape == [micro, drv.SEQ // 2, C] for shape in seen), seen


@pytest.mark.slow
def test_cp_resume_with_dropout_is_exact(four_ranks):
    """dp_shard 2 x cp 2 with dropout: each rank (each cp rank too) draws its own masks, and the resume
    from step 2 gives each its RNG state back, so steps 3 and 4 are the uninterrupted run's exactly."""
    full, resumed = (drv.load_result(four_ranks, n) for n in ("cp_dropout", "cp_dropout_resumed"))
    assert resumed["loaded_step"] == 2 and sorted(resumed["losses"]) == [3, 4]
    assert [resumed["losses"][s] for s in (3, 4)] == [full["losses"][s] for s in (3, 4)]
    assert [resumed["norms"][s] for s in (3, 4)] == [full["norms"][s] for s in (3, 4)]


@pytest.mark.slow
def test_tp_is_applied_inside_each_stage_and_to_the_qk_norm(four_ranks):
    """Rank 0 (pp 0, tp 0) holds only stage 0 (embeddings + block 0), its projections split over tp
    and its attention with half the heads; under qk_norm the per-head norm gains are sharded by FSDP
    and replicated over tp (their gradient is summed over the tp ranks' heads)."""
    layout = drv.load_result(four_ranks, "pp_tp")["layout"]
    cfg = drv_config("modern")
    d, kv = cfg.head_dim, cfg.n_kv_head
    assert layout["heads"] == [[cfg.n_head // 2, kv // 2]]
    assert "lm_head.weight" not in layout and "transformer.h.1.attn.c_attn.weight" not in layout
    c_attn = layout["transformer.h.0.attn.c_attn.weight"]
    assert c_attn["placements"] == ["S(0)"] and c_attn["local"] == [(cfg.n_head + 2 * kv) * d // 2, C]
    assert layout["transformer.h.0.attn.c_proj.weight"]["local"] == [C, cfg.n_head * d // 2]
    qk = drv.load_result(four_ranks, "tp_qk_norm")["layout"]
    for part in ("q_norm", "k_norm"):
        gain = qk[f"transformer.h.0.attn.{part}.weight"]
        assert gain["placements"] == ["S(0)", "R"] and gain["local"] == [d // 2], gain  # (dp_shard, tp)


def test_tp_needs_a_window_it_divides():
    from train.parallel.dims import MeshError, ParallelDims, check_model

    cfg, dims = ModelConfig(**{**drv_config("modern").to_dict(), "vocab_size": 96}), ParallelDims(tp=2, world_size=2)
    with pytest.raises(MeshError, match=r"data.seq_len=15 must be divisible by parallel.tp=2 \(sequence parallel"):
        check_model(dims, cfg, 15)
    check_model(dims, cfg, 16)


def test_each_cp_and_pp_rank_draws_its_own_dropout_stream():
    """The loop seeds train.seed + rng_rank: distinct for each (dp, cp, pp) coordinate, the same within
    a tp group (tp's replicated activations need one mask), the data-parallel rank without cp and pp."""
    from train.parallel.dims import ParallelDims

    dims = [ParallelDims(pp=2, dp_shard=2, cp=2, tp=2, world_size=16, rank=r) for r in range(16)]
    by_stream: dict[int, set] = {}
    for d in dims:
        c = d.coords()
        by_stream.setdefault(d.rng_rank, set()).add((c["pp"], c["dp_shard"], c["cp"]))
    assert sorted(by_stream) == list(range(8)) and all(len(coords) == 1 for coords in by_stream.values())
    for r in range(8):
        d = ParallelDims(dp_replicate=2, dp_shard=2, tp=2, world_size=8, rank=r)
        assert d.rng_rank == d.dp_rank


SAMPLE_PROMPTS = ([5, 6, 7], [1, 2, 3, 4])


def forward_only(out: Path) -> None:
    """pp 2 x tp 2, forward only (what evaluation, HellaSwag and the training log's samples call): the
    view's logits and mean loss, and greedy samples through the strategy's decoder, on rank 0; the
    untrained model of seed 0, as the reference builds it."""
    import torch.distributed as dist

    from model.loss import mean_loss
    from train.parallel.build import make_strategy
    from train.sample import generate
    from train.strategy import StrategySpec

    s = make_strategy("none", "cpu", StrategySpec(grad_accum_steps=ACCUM), pp=2, tp=2)
    torch.manual_seed(0)
    s.wrap(GPT(model_config("modern")), drv.build_optimizer)
    x, y = drv.global_batch(STEPS + 1)
    view = s.eval_model()
    with torch.no_grad():
        logits = view.eval()(x)  # (B, T, V) on every rank
        loss = mean_loss(view, [(x, y)])
    # prompts of odd and even length, so that windows of both parities split over the 2 tp ranks
    samples = [generate(s.sample_decoder(), prompt, 6, temperature=0) for prompt in SAMPLE_PROMPTS]
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "loss": loss, "samples": samples}, out / "forward.pt")
    s.teardown()


@pytest.fixture(scope="module")
def forward(four_ranks) -> dict:
    return torch.load(four_ranks / "forward.pt")


@pytest.mark.slow
def test_forward_only_view_matches_one_process(forward):
    torch.manual_seed(0)
    model = GPT(model_config("modern")).eval()
    x, y = drv.global_batch(STEPS + 1)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(forward["logits"], want, atol=1e-5, rtol=1e-5)
    assert forward["loss"] == pytest.approx(torch.nn.functional.cross_entropy(want.flatten(0, 1), y.flatten()).item())
    from train.sample import generate

    # tp's sequence parallel cannot take one token at a time: whole windows, padded to a multiple of tp
    assert forward["samples"] == [generate(model, prompt, 6, temperature=0) for prompt in SAMPLE_PROMPTS]


def main() -> None:
    """tests/dist_driver.py's scenarios, then (when asked) forward_only, in one process group."""
    import torch.distributed as dist

    from train.parallel.world import init_distributed

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    torch.set_num_threads(1)
    init_distributed("cpu", "driver")
    for sc in spec["scenarios"]:
        drv.run_scenario(sc, out)
    if spec["forward_only"]:
        forward_only(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
