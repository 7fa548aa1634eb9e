"""Context parallel (train/parallel/context.py) against one process, on the CPU with gloo.

The sharding is checked by hand-written layouts in this process; the rest runs in 2 ranks under
torchrun, this file being the worker (`python -m torch.distributed.run ... tests/test_dist_cp.py OUT`):
each rank builds the same tiny model, runs the plain one-process forward/backward over the whole
window as the reference, then the context-parallel one over its half (gradients averaged over the cp
ranks, as the dp x cp reduction does), and rank 0 writes what the tests compare. Then the real loop
(`python -m train`, parallel.cp=2 under torchrun) and tp 2 x cp 2 (4 ranks, tests/dist_driver.py)
against one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import dist_driver as drv
import pytest
import torch
from docs_helpers import run_documented
from test_dist_loop import COMMON, EVAL_1, assert_same_curve
from train_helpers import metrics, prepared_dataset, tiny_config, tiny_overrides

from train.loop import run
from train.parallel.context import chunk_order, sequence_positions, shard_sequence

SEQ = 64  # a window long enough that the activation memory is dominated by per-token tensors
EOT = 3
# (family, doc_mask, doc_positions_restart): GPT-2 (learned positions, MHA) and modern (RoPE, GQA 4:2)
CASES = [
    ("gpt2", False, False),
    ("gpt2", True, False),
    ("modern", False, False),
    ("modern", True, True),
]
# The FlexAttention BlockMask path (the CUDA default), here uncompiled on the CPU.
FLEX_CASES = [("gpt2", False, False), ("modern", True, True)]
TOL = 1e-5


def case_name(family: str, doc: bool, restart: bool, flex: bool = False) -> str:
    return f"{family}{'_doc' if doc else ''}{'_restart' if restart else ''}{'_flex' if flex else ''}"


FLEX_CASES_RUN = [(*c, True) for c in FLEX_CASES]
MATCH_CASES = [*CASES, *FLEX_CASES_RUN]


def test_shard_layout_is_load_balanced():
    # cp=2, T=8: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (Llama 3's layout).
    t = torch.arange(8)[None]
    assert shard_sequence(t, 0, 2).tolist() == [[0, 1, 6, 7]]
    assert shard_sequence(t, 1, 2).tolist() == [[2, 3, 4, 5]]
    # cp=3, T=6: rank i holds chunks i and 5-i.
    assert [sequence_positions(6, r, 3).tolist() for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
    assert chunk_order(1, 4) == (1, 6)
    # Every rank gets the same number of causal (query, key) pairs: the point of the mirror chunks.
    for cp in (2, 4):
        pairs = {int((sequence_positions(32, r, cp) + 1).sum()) for r in range(cp)}
        assert len(pairs) == 1, pairs
    # Extra trailing dimensions travel with their token.
    x = torch.arange(16).view(1, 8, 2)
    assert shard_sequence(x, 1, 2)[0, :, 0].tolist() == [4, 6, 8, 10]


# ------------------------------------------------------------------ the 2-rank runs
@pytest.fixture(scope="module")
def cp2(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("cp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{drv.REPO}{os.pathsep}{drv.REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", __file__, str(work)]
    proc = subprocess.run(cmd, env=env, cwd=drv.REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((work / "cp2.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", MATCH_CASES, ids=[case_name(*c) for c in MATCH_CASES])
def test_cp2_matches_one_process(cp2, case):
    r = cp2[case_name(*case)]
    assert r["loss_ref"] > 3.0  # a real loss of a fresh model over 97 tokens (ln 97 = 4.57)
    assert abs(r["loss_cp"] - r["loss_ref"]) < TOL, r
    assert abs(r["eval_cp"] - r["loss_ref"]) < TOL, r  # ContextParallelEval: the window's mean loss
    if case not in FLEX_CASES_RUN:  # FlexAttention has no backward on the CPU: the forward only
        assert r["grad_max_diff"] < TOL, r
        assert r["grad_max_abs"] > 1e-3  # the gradients compared are not all zero


@pytest.mark.slow
def test_doc_mask_changes_the_loss(cp2):
    # The EOTs inside the window matter: without them the reference would not differ.
    assert abs(cp2["gpt2_doc"]["loss_ref"] - cp2["gpt2"]["loss_ref"]) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case_name(*c) for c in CASES])
def test_cp_is_applied(cp2, case):
    r = cp2[case_name(*case)]
    # Attention sees this rank's T/cp queries, and the keys of the whole window.
    assert r["attn_query_len"] == [SEQ // 2]
    assert r["attn_key_len"] == [SEQ]
    # Activations saved for the backward, per rank: about half the one-process run's (all but the
    # gathered keys/values scale with T/cp).
    assert r["saved_bytes_cp"] < 0.6 * r["saved_bytes_ref"], r


@pytest.mark.slow
def test_strategy_runs_cp(cp2):
    r = cp2["strategy"]
    assert r["query_len"] == [SEQ // 2, SEQ // 2], r  # forward_backward, then eval_model's forward
    assert abs(r["loss_cp"] - r["loss_ref"]) < TOL, r
    assert abs(r["eval_cp"] - r["loss_ref"]) < TOL, r


# ------------------------------------------------------------------ through the real loop
# GPT-2 family (learned positions), and the modern one with GQA, document masking with position
# restarts (the bytes corpus has an EOT before every document) and activation checkpointing.
LOOP_CASES = {
    "gpt2": [],
    "modern_gqa_doc": [
        "model.family=modern",
        "model.bias=false",
        "model.tie_embeddings=false",
        "model.n_kv_head=2",
        "model.doc_mask=true",
        "model.doc_positions_restart=true",
        "train.activation_checkpointing=true",  # the recomputed forward gathers the keys/values again
    ],
}
LOOP_STEPS = 10
DOC_COMMAND = "bash launch.sh --nproc 2 configs/debug.yaml parallel.cp=2 train.run_dir=runs/cp2"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_dataset(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("case", LOOP_CASES)
def test_cp2_through_the_loop_matches_one_process(data, tmp_path, case):
    """docs/distributed.md's `bash launch.sh --nproc 2 ... parallel.cp=2` (python -m train under torchrun,
    FSDP over dp_shard x cp = 2) with tiny overrides: every step's loss
    and the evaluations (eval_every=4, and the last step) equal the one-process run's; checkpoints
    (every 4 steps) are written by DCP on both ranks."""
    extra = [*LOOP_CASES[case], EVAL_1, f"train.max_steps={LOOP_STEPS}"]
    run(tiny_config(data, tmp_path / "ref", *COMMON, *extra), log=lambda m: None)
    run_documented(DOC_COMMAND, tiny_overrides(data, tmp_path / "cp2", *COMMON, *extra))  # tiny overrides appended
    got = metrics(tmp_path / "cp2")
    assert_same_curve(got, metrics(tmp_path / "ref"), LOOP_STEPS)
    assert any("val_loss" in r for r in got)
    assert (tmp_path / "cp2" / "checkpoints" / "step_000008").is_dir()


# ------------------------------------------------------------------ tp 2 x cp 2
TPCP_STEPS = 10
TPCP_FAMILIES = ["gpt2", "modern"]  # tied head; untied with loss parallel and GQA (1 kv head per tp rank)


@pytest.mark.slow
def test_tp2_cp2_matches_one_process(tmp_path):
    """4 ranks, tensor parallel 2 (with sequence parallel) x context parallel 2, driven through the
    Strategy seam by tests/dist_driver.py: each step's loss and gradient norm equal one process's."""
    scenarios = [
        {"name": f"tpcp_{f}", "strategy": "none", "options": {"tp": 2, "cp": 2}, "steps": TPCP_STEPS, "family": f}
        for f in TPCP_FAMILIES
    ]
    drv.launch_ok({"out": str(tmp_path), "driver_group": True, "scenarios": scenarios}, 4, tmp_path, "tpcp")
    for f in TPCP_FAMILIES:
        ref = drv.run_scenario({"name": f"ref_{f}", "strategy": "none", "steps": TPCP_STEPS, "family": f}, tmp_path)
        got = drv.load_result(tmp_path, f"tpcp_{f}")
        assert got["world_size"] == 4
        for step in range(1, TPCP_STEPS + 1):
            assert abs(got["losses"][step] - ref["losses"][step]) < TOL, (f, step, got, ref)
            assert abs(got["norms"][step] - ref["norms"][step]) < TOL, (f, step, got, ref)


# ------------------------------------------------------------------ worker (under torchrun)
def batch(doc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, SEQ) windows; with doc, EOTs sit inside both cp ranks' chunks (SEQ=64, cp=2: rank 0 holds
    [0, 16) and [48, 64), rank 1 [16, 48)), so rank 0's late tokens depend on rank 1's EOTs."""
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(EOT + 1, drv.VOCAB, (2, SEQ + 1), generator=g)
    if doc:
        seq[0, [5, 20, 40]] = EOT
        seq[1, [30, 50]] = EOT
    return seq[:, :-1], seq[:, 1:]


def run_case(family: str, doc: bool, restart: bool, group, flex: bool = False) -> dict:
    from model.gpt import GPT
    from model.loss import mean_loss
    from train.parallel.context import ContextParallel, ContextParallelEval

    cfg = dataclasses.replace(
        drv.model_config(family), block_size=SEQ, doc_mask=doc, doc_positions_restart=restart, eot_id=EOT
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = batch(doc)

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(fn) -> tuple[torch.Tensor, int]:
        """fn's output and the bytes of the activations its graph saves for the backward (weights aside)."""
        total = 0

        def pack(t):
            nonlocal total
            if t.untyped_storage().data_ptr() not in weights:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, total

    loss_ref, bytes_ref = saved_bytes(lambda: model(x, y))
    loss_ref.backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    cp = ContextParallel(cfg, group, flex=flex)
    seen_q, seen_k = [], []
    attn = model.transformer.h[0].attn
    hook = attn.register_forward_pre_hook(lambda m, args: seen_q.append(args[0].shape[1]))
    gather = cp.gather_kv

    def spy(layer, k, v):
        k, v = gather(layer, k, v)
        if layer == 0:
            seen_k.append(k.shape[2])
        return k, v

    cp.gather_kv = spy
    with torch.no_grad() if flex else contextlib.nullcontext():  # FlexAttention has no CPU backward
        loss_cp, bytes_cp = saved_bytes(lambda: cp.loss(model, x, y))
    hook.remove()
    cp.gather_kv = gather
    if not flex:
        loss_cp.backward()
    # The dp x cp gradient reduction: the mean over the cp ranks of each rank's partial gradient.
    diff, big = 0.0, 0.0
    for n, p in model.named_parameters() if not flex else ():
        g = p.grad.clone()
        torch.distributed.all_reduce(g, group=group)
        g /= cp.size
        diff = max(diff, float((g - grads_ref[n]).abs().max()))
        big = max(big, float(grads_ref[n].abs().max()))
    loss_mean = loss_cp.detach().clone()
    torch.distributed.all_reduce(loss_mean, group=group)
    eval_cp = mean_loss(ContextParallelEval(model, cp), [(x, y)])
    return {
        "loss_ref": loss_ref.item(),
        "loss_cp": float(loss_mean) / cp.size,
        "grad_max_diff": diff,
        "grad_max_abs": big,
        "eval_cp": eval_cp,
        "attn_query_len": seen_q,
        "attn_key_len": seen_k,
        "saved_bytes_ref": bytes_ref,
        "saved_bytes_cp": bytes_cp,
    }


def run_strategy() -> dict:
    """The loop's seam under parallel.cp=2 (train/parallel/mesh_strategy.py): forward_backward and
    eval_model run this rank's half of the window."""
    from model.gpt import GPT
    from model.loss import mean_loss
    from train.parallel.build import make_strategy
    from train.strategy import StrategySpec, unwrap

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(drv.model_config("modern"), block_size=SEQ))
    x, y = batch(False)
    ref = model(x, y).item()
    s = make_strategy("none", torch.device("cpu"), StrategySpec(), cp=2)
    wrapped, _ = s.wrap(model, drv.build_optimizer)
    seen = []
    unwrap(wrapped).transformer.h[0].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    loss = s.forward_backward([(x, y)], contextlib.nullcontext()).detach()
    res = {
        "loss_ref": ref,
        "loss_cp": float(s.all_reduce_sum(loss) / s.world_size),
        "eval_cp": mean_loss(s.eval_model(), [(x, y)]),
        "query_len": seen,
    }
    s.teardown()
    return res


def main(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    res = {case_name(*c): run_case(*c[:3], group, *c[3:]) for c in MATCH_CASES}
    res["strategy"] = run_strategy()
    if dist.get_rank() == 0:
        (out / "cp2.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
