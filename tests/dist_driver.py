"""Drives the Strategy interface through the loop's exact call sequence (train/strategy.py's
docstring) on a tiny GPT and fixed synthetic batches, saving and loading through the real
CheckpointManager; used by tests/test_dist_*.py.

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/dist_driver.py SPEC.json

SPEC.json: {"out": DIR, "driver_group": bool, "scenarios": [{...}, ...]}. Each scenario names a
strategy, its options (activation_checkpointing and compile go into the StrategySpec, the rest to
make_strategy), the gradient-accumulation steps, the steps to run, where to save (save_model:
whether the checkpoint gets its model/ artifact, default true), what to resume from and after which
step to draw the training log's samples through the strategy's decoder (sample_at); rank 0
writes DIR/<name>.json (per-step global losses and grad norms) and DIR/<name>.final.pt (the final
full state dict). With driver_group the driver creates the process group (so several scenarios
share it) and the strategies reuse it; otherwise each strategy owns it.
run_scenario() also runs in the pytest process for strategy "none", the one-process reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.gpt import GPT
from model.moe import after_step
from train.checkpoint import CheckpointManager, TrainState
from train.parallel.build import make_strategy
from train.sample import generate
from train.strategy import StrategySpec, unwrap

GLOBAL_BATCH = 8  # rows per optimizer step, whatever the world size and accumulation
SEQ = 16
VOCAB = 97
REPO = Path(__file__).resolve().parents[1]
SAMPLE_PROMPT = [5, 6, 7]  # the prompt of the samples that "sample_at" asks for


def model_config(family: str = "gpt2") -> ModelConfig:
    if family == "moe":  # the modern GPT with a mixture of experts in every block (model/moe.py)
        return dataclasses.replace(
            model_config("modern"),
            n_experts=4,
            moe_top_k=2,
            n_shared_experts=1,
            moe_hidden=32,
            moe_aux_loss_coef=0.0,  # the balance loss of a batch is not the mean of its parts' (nonlinear)
            moe_z_loss_coef=1e-3,
            moe_bias_update_rate=1e-3,
        )
    if family == "modern":
        return ModelConfig(
            vocab_size=VOCAB,
            block_size=SEQ,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            n_embd=64,
            family="modern",
            bias=False,
            tie_embeddings=False,
        )
    return ModelConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=64)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (1-based): the same tensors in every process and run."""
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def build_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in module.parameters() if p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    # eps=1e-6, not 1e-8: the attention key bias has an exactly-zero true gradient (softmax is
    # shift-invariant), so its gradient is rounding noise that Adam with a tiny eps would
    # normalise into lr-sized, reduction-order-dependent updates.
    return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-6, foreach=False)


def build_muon(module: torch.nn.Module) -> torch.optim.Optimizer:
    """The training loop's Muon + AdamW (train/optim.py), Newton-Schulz in fp32 so that layouts compare."""
    from train.config import OptimSection
    from train.optim import build_optimizer as build

    return build(module, OptimSection(name="muon", lr=3e-3, eps=1e-6, muon_ns_dtype="float32", fused=False))


def param_digest(model: torch.nn.Module) -> str:
    flat = torch.cat([p.detach().float().flatten().cpu() for p in unwrap(model).parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def run_scenario(sc: dict, out: Path) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    options = dict(sc.get("options", {}))
    accum, clip = sc.get("accum", 1), sc.get("clip", 1.0)
    spec = StrategySpec(
        precision=sc.get("precision", "fp32"),
        grad_accum_steps=accum,
        grad_clip=clip,
        activation_checkpointing=options.pop("activation_checkpointing", False),
        compile=options.pop("compile", False),
    )
    s = make_strategy(sc["strategy"], torch.device(sc.get("device", "cpu")), spec, **options)
    world = s.world_size
    mcfg = model_config(sc.get("family", "gpt2"))
    # Each rank initialises differently (the loop seeds rank r with seed + r for its dropout
    # stream): wrap() must start every rank from rank 0's weights, the reference's.
    torch.manual_seed(sc.get("seed", 0) + rank)
    model = GPT(mcfg)
    model, _ = s.wrap(model, build_muon if sc.get("optim") == "muon" else build_optimizer)
    bare = unwrap(model)
    res: dict = {
        "world_size": world,
        "losses": {},
        "norms": {},
        # a pipeline stage may hold neither the table nor the head
        "tied": "wte" in bare.transformer
        and bare.lm_head is not None
        and bare.lm_head.weight is bare.transformer.wte.weight,
    }

    a2a_rows: list[int] = []  # with record_layout: the rows of each training all_to_all this rank sent
    if sc.get("record_layout"):  # what the layout did to the parameters and to the activations
        res["layout"] = layout_of(bare)
        seen = []
        hook = bare.transformer.h[-1].register_forward_pre_hook(lambda m, args: seen.append(list(args[0].shape)))
        res["block_input"] = seen
        # rows this rank sends by the differentiable all_to_all (expert parallel's dispatch and combine)
        import torch.distributed._functional_collectives as funcol

        a2a = funcol.all_to_all_single_autograd

        def counting(x, *args, **kwargs):
            a2a_rows.append(x.shape[0])
            return a2a(x, *args, **kwargs)

        funcol.all_to_all_single_autograd = counting

    start = 0
    if sc.get("expect_error"):  # a user error: every rank must raise it, before any collective
        try:
            manager(s, mcfg, sc["load"]).load(Path(sc["load"]))
            res["error"] = None
        except Exception as e:  # the message is what the test checks
            res["error"] = f"{type(e).__name__}: {e}"
        if rank == 0:
            (out / f"{sc['name']}.json").write_text(json.dumps(res))
        del model, bare
        s.teardown()
        return res
    if sc.get("load"):
        m = manager(s, mcfg, sc["load"])
        m.clean_stale()  # as the loop does at start-up (main rank): what a killed resume left
        s.barrier()
        state = m.load(Path(sc["load"]))
        start = state.step
        res["loaded_step"] = start
        res["extra_roundtrip"] = bool(
            torch.equal(state.loader["probe"], torch.arange(5) * start)
            and state.loader["nested"] == {"a": [1, 2.5, "x"]}
        )

    dims = getattr(s, "dims", None)  # the mesh's data-parallel rank and size; DeepSpeed: every rank
    dp_rank, dp_size = (dims.dp_rank, dims.dp_size) if dims is not None else (rank, world)
    rows = GLOBAL_BATCH // dp_size
    micro = rows // accum
    for step in range(start + 1, sc["steps"] + 1):
        x, y = global_batch(step)
        x, y = x[dp_rank * rows : (dp_rank + 1) * rows], y[dp_rank * rows : (dp_rank + 1) * rows]
        model.train()
        batches = [
            (x[m * micro : (m + 1) * micro].to(s.device), y[m * micro : (m + 1) * micro].to(s.device))
            for m in range(accum)
        ]
        total = s.forward_backward(batches, contextlib.nullcontext()).detach().float().cpu()
        norm = s.clip_and_step()
        s.zero_grad()
        after_step(bare)  # MoE routing biases, as the loop (a no-op for dense models)
        mean = s.all_reduce_sum(total) / world  # equal micro-batches: the global mean
        res["losses"][step] = float(mean)
        res["norms"][step] = float(norm)
        if step == sc.get("sample_at"):  # greedy and drawn samples through the layout's decoder, mid-run
            trained = len(a2a_rows)
            res["samples"] = [generate(s.sample_decoder(), SAMPLE_PROMPT, 8, temperature=t) for t in (0, 1.0)]
            del a2a_rows[trained:]  # decoding's all_to_alls (one token, often no row for a peer) are not training's
        if step == sc.get("save_at"):
            save(s, mcfg, Path(sc["save_dir"]), step, with_model=sc.get("save_model", True))
            sd = s.model_state_dict()
            if rank == 0:
                torch.save({k: v.detach().cpu().clone() for k, v in sd.items()}, out / f"{sc['name']}.saved_sd.pt")

    if sc.get("record_layout"):
        hook.remove()
        res["all_to_all_rows"] = a2a_rows
        funcol.all_to_all_single_autograd = a2a
    if dist.is_initialized() and sc.get("check_replicas"):  # replicated (not sharded) parameters
        digests = [None] * world
        dist.all_gather_object(digests, param_digest(model))
        res["params_equal_across_ranks"] = len(set(digests)) == 1
    sd = s.model_state_dict()
    if rank == 0:
        torch.save({k: v.detach().float().cpu().clone() for k, v in sd.items()}, out / f"{sc['name']}.final.pt")
        (out / f"{sc['name']}.json").write_text(json.dumps(res))
    del model, bare, sd
    s.teardown()
    return res


def layout_of(model: torch.nn.Module) -> dict:
    """name -> {"placements": a DTensor's placements (None: a plain tensor), "local": this rank's shape};
    and each attention's local head counts."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        dt = isinstance(p, DTensor)
        out[name] = {
            "placements": [str(pl) for pl in p.placements] if dt else None,
            "local": list(p.to_local().shape if dt else p.shape),
        }
    out["heads"] = [[b.attn.n_head, b.attn.n_kv_head] for b in model.transformer.h]
    return out


def manager(s, mcfg: ModelConfig, ckpt: str) -> CheckpointManager:
    return CheckpointManager(Path(ckpt).parents[1], s, mcfg, keep_last=0)


def save(s, mcfg: ModelConfig, run_dir: Path, step: int, with_model: bool) -> None:
    """The loop's checkpoint: every rank calls CheckpointManager.save. The loader slot carries a
    tensor and nested python, to check they come back as saved."""
    state = TrainState(
        step=step,
        loader={"probe": torch.arange(5) * step, "nested": {"a": [1, 2.5, "x"]}},
        world_size=s.world_size,
        strategy=s.name,
        model_config=mcfg.to_dict(),
        artifact_metadata={"step": step, "tokenizer": "bytes"},
    )
    CheckpointManager(run_dir, s, mcfg, keep_last=0).save(state, with_model=with_model)


def launch(
    spec: dict, nproc: int, spec_path: Path, timeout: float = 600, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run this driver under torchrun with nproc processes (one thread each: 2 ranks, 2 cores);
    extra_env: more environment variables (e.g. the GPTRAIN_FAULT hook)."""
    spec_path.write_text(json.dumps(spec))
    cuda = any(sc.get("device", "cpu").startswith("cuda") for sc in spec["scenarios"])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cuda" if cuda else "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(extra_env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--standalone",
        str(Path(__file__).resolve()),
        str(spec_path),
    ]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def launch_ok(spec: dict, nproc: int, work: Path, tag: str) -> None:
    """launch() into work/spec_TAG.json, asserting that torchrun exited 0: no rank failed, and none
    aborted at interpreter exit."""
    proc = launch(spec, nproc, work / f"spec_{tag}.json")
    assert proc.returncode == 0, (
        f"torchrun ({tag}) exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def load_result(out: Path, name: str) -> dict:
    res = json.loads((out / f"{name}.json").read_text())
    for key in ("losses", "norms"):
        res[key] = {int(k): v for k, v in res.get(key, {}).items()}
    return res


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside DeepSpeed's comm calls
    if any(sc["strategy"] == "deepspeed" and sc.get("device", "cpu") == "cpu" for sc in spec["scenarios"]):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce on first use (over a minute,
        # then cached); the tests use plain gloo collectives instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    owned = None
    if spec.get("driver_group"):
        from train.parallel.world import init_distributed

        owned = init_distributed(spec["scenarios"][0].get("device", "cpu"), "driver")
    for sc in spec["scenarios"]:
        run_scenario(sc, out)
    if owned is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
