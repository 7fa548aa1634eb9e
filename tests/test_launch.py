"""launch.sh: the argument handling and the multi-node / SLURM mapping, with a stand-in torchrun
that records its arguments; then the real torchrun: `--nproc 2` on one node, and two "nodes" on this
machine (two launch.sh invocations, NNODES=2, HSDP across them) that must train like it; one process resumes the
`--nproc 2` run's checkpoint; a user error under torchrun is one line."""

from __future__ import annotations

import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from docs_helpers import documented
from train_helpers import DEBUG_YAML, REPO, prepared_dataset, python_env, tiny_config, tiny_overrides, train_losses


def fake_torchrun(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "torchrun_args.txt"
    exe = tmp_path / "torchrun"
    exe.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > {log}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, log


def run_launch(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in python_env().items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    return subprocess.run(
        ["bash", "launch.sh", *args],
        cwd=REPO,
        env={**base, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_slurm_variables_become_torchrun_rendezvous(tmp_path):
    exe, log = fake_torchrun(tmp_path)
    slurm = {
        "TORCHRUN": str(exe),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu-a,gpu-b",
        "SLURM_GPUS_ON_NODE": "8",
    }
    proc = run_launch([str(DEBUG_YAML), "train.max_steps=3"], slurm)
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().split("\n")
    assert "--nnodes=2" in args and "--node_rank=1" in args and "--nproc_per_node=8" in args
    assert "--master_addr=gpu-a" in args
    assert f"--master_port={20000 + 4242 % 20000}" in args
    # the config and overrides pass through; 16 ranks of strategy none become ddp
    assert args[args.index("--config") + 1] == str(DEBUG_YAML)
    assert "train.max_steps=3" in args and "parallel.strategy=ddp" in args


def test_manual_multinode_and_deepspeed_flag(tmp_path):
    exe, log = fake_torchrun(tmp_path)
    env = {"TORCHRUN": str(exe), "NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3"}
    proc = run_launch(["--nproc", "4", "--deepspeed", str(DEBUG_YAML)], env)
    assert proc.returncode == 0, proc.stderr
    args = log.read_text().split("\n")
    assert {
        "--nnodes=3",
        "--node_rank=2",
        "--master_addr=10.1.2.3",
        "--master_port=29500",
        "--nproc_per_node=4",
        "parallel.strategy=deepspeed",
    } <= set(args)


@pytest.mark.parametrize(
    "env,args,message",
    [
        ({"NNODES": "2"}, [str(DEBUG_YAML)], "needs NODE_RANK and MASTER_ADDR"),
        ({}, ["--nproc", "zero", str(DEBUG_YAML)], "--nproc must be a positive integer"),
        ({}, ["configs/nope.yaml"], "config file configs/nope.yaml not found"),
        (
            {
                "SLURM_JOB_ID": "1",
                "SLURM_JOB_NUM_NODES": "2",
                "SLURM_NODEID": "0",
                "SLURM_JOB_NODELIST": "n[1-2]",
                "PATH": "/usr/bin:/bin",
            },
            [str(DEBUG_YAML)],
            "without scontrol; set MASTER_ADDR",
        ),
    ],
)
def test_launch_errors_are_one_clear_line(tmp_path, env, args, message):
    exe, log = fake_torchrun(tmp_path)
    proc = run_launch(args, {"TORCHRUN": str(exe), **env})
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not log.exists(), "nothing may be launched after a launch error"


def launch_env() -> dict:
    """The real launch: TORCHRUN unset, so launch.sh starts `python -m train.torchrun` (train/torchrun.py)."""
    return {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def nproc2_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`bash launch.sh --nproc 2` on the CPU: two gloo ranks of DDP on one node (also the multi-node
    test's reference); the command docs/distributed.md and docs/training.md show, tiny overrides appended."""
    data = prepared_dataset(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("launch") / "nproc2"
    shown = documented("bash launch.sh --nproc 2 configs/debug.yaml")[2:]  # after `bash launch.sh`
    proc = run_launch(
        [*shown, *tiny_overrides(data, run_dir, "train.max_steps=3", "checkpoint.every=2")],
        launch_env(),
        timeout=300,
    )
    return proc, run_dir, data


@pytest.mark.slow
def test_launch_nproc2_end_to_end(nproc2_run):
    """Two gloo ranks of DDP train and checkpoint, exit 0."""
    proc, run_dir, _ = nproc2_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "parallel.strategy=ddp" in proc.stderr
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"


@pytest.mark.slow
def test_a_user_error_under_launch_sh_is_one_line_and_no_traceback(nproc2_run, tmp_path):
    """The step does not split over 2 ranks: every rank raises the same DataError, rank 0 alone prints it
    and exits 2, the launch exits non-zero, and nothing prints a Python traceback (no rank, and not torchrun's agent:
    train/torchrun.py ends its ChildFailedError with one line)."""
    _, _, data = nproc2_run
    run_dir = tmp_path / "r"
    args = ["--nproc", "2", str(DEBUG_YAML), *tiny_overrides(data, run_dir, "train.tokens_per_step=128")]
    proc = run_launch(args, launch_env(), timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not divide into micro_batch" in errors[0], proc.stderr[-3000:]
    assert errors[0].startswith("error: tokens_per_step=128") and "rank 1" not in errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.splitlines()[-1]
    assert "rank(s) failed" in last
    codes = re.search(r"\(exit code ([-\d, ]+)\)", last)
    assert codes and "2" in codes.group(1).split(", "), (
        last
    )  # a rank exited with our code (torchrun may stop the other first)
    assert not (run_dir / "checkpoints").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_hsdp_like_one_node_with_two_processes(nproc2_run, tmp_path):
    """Multi-node for real, with the layout docs/distributed.md recommends across nodes: two `bash
    launch.sh --nproc 2` invocations, NNODES=2 and NODE_RANK 0 / 1, rendezvous at MASTER_ADDR=127.0.0.1,
    one world of 4 ranks as HSDP (dp_replicate 2 across the nodes x dp_shard 2 inside each). The same
    global batch in micro-batches of half the size (4 ranks x 2 windows against 2 x 4) trains to the
    losses of DDP `--nproc 2` on one node."""
    ref_proc, ref_dir, data = nproc2_run
    assert ref_proc.returncode == 0, ref_proc.stderr[-4000:]
    run_dir = tmp_path / "two-nodes"
    hsdp = ["parallel.dp_replicate=2", "parallel.dp_shard=2", "train.micro_batch=2"]
    extra = ["train.max_steps=3", "checkpoint.every=2", *hsdp]
    args = ["--nproc", "2", str(DEBUG_YAML), *tiny_overrides(data, run_dir, *extra)]
    base = {k: v for k, v in python_env().items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    node_env = {**base, "PYTHON": sys.executable, **launch_env(), "NNODES": "2", "MASTER_ADDR": "127.0.0.1"}
    node_env["MASTER_PORT"] = str(free_port())
    logs = []
    nodes = []
    for rank in (0, 1):
        out = open(tmp_path / f"node{rank}.log", "w")  # noqa: SIM115 -- closed below
        logs.append(out)
        nodes.append(
            subprocess.Popen(
                ["bash", "launch.sh", *args],
                cwd=REPO,
                env={**node_env, "NODE_RANK": str(rank)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
        for out in logs:
            out.close()
    text = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert codes == [0, 0], [t[-3000:] for t in text]
    assert "--nnodes=2 --node_rank=0" in text[0] and "--nnodes=2 --node_rank=1" in text[1]
    assert "--nproc_per_node=2" in text[0] and "--nproc_per_node=2" in text[1]
    # one world of 4 ranks (not two worlds of 2), laid out as HSDP: replicas across the nodes
    assert "device cpu x 4" in text[0], text[0][-3000:]
    mesh = "mesh pp 1 x dp_replicate 2 x dp_shard 2 x cp 1 x tp 1 | rank 0 at (pp 0, dp_replicate 0, dp_shard 0"
    assert mesh in text[0], text[0][-3000:]
    got, want = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        # fp32, dropout 0: the same 8 windows per step; only the reductions' order differs
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"


@pytest.mark.slow
def test_the_ddp_checkpoint_resumes_in_one_process(nproc2_run, tmp_path):
    """End to end through the real loop: the step-2 checkpoint of `--nproc 2` (DDP, 2 ranks) resumed by
    one process (parallel.strategy=none) to step 4: every loss is the uninterrupted one-process run's
    (same global batch; the loader continues the global stream)."""
    from train.loop import run

    proc, two_ranks, data = nproc2_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (two_ranks / "checkpoints" / "step_000002" / "model" / "model.safetensors").is_file()
    ref_dir, resumed = tmp_path / "ref", tmp_path / "resumed"
    run(tiny_config(data, ref_dir, "train.max_steps=4"), log=lambda m: None)
    said = []
    ckpt = two_ranks / "checkpoints" / "step_000002"
    run(tiny_config(data, resumed, "train.max_steps=4", f"train.resume={ckpt}"), log=said.append)
    assert any(f"resumed from {ckpt}" in line for line in said), said
    want, got = train_losses(ref_dir), {**train_losses(two_ranks), **train_losses(resumed)}
    assert sorted(train_losses(resumed)) == [3, 4] and sorted(want) == [1, 2, 3, 4]
    for step in want:
        # fp32, dropout 0: only the reduction order differs (2 ranks x 1 micro-batch vs 1 x 2)
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
