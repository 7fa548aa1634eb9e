"""A mixture-of-experts checkpoint through the real commands: python -m train on configs/moe-demo.yaml
(tiny overrides) logs routing health and moves the routing bias; eval.sample, eval.evaluate and the
server read the checkpoint; KV-cache generation equals no-cache generation; int8 and ONNX exports
refuse in one line. Tiny models on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import require_extra
from train_helpers import REPO, TINY, metrics, prepared_dataset

from eval.backends import TorchBackend
from eval.generate import generate, generate_no_cache
from model.io import load_model

MOE = [
    "model.family=modern",
    "model.bias=false",
    "model.tie_embeddings=false",
    "model.mlp=swiglu",
    "model.n_experts=4",
    "model.moe_top_k=2",
    "model.moe_hidden=48",
    "model.n_shared_experts=1",
    "model.moe_z_loss_coef=0.001",
    "model.moe_bias_update_rate=0.01",
]


def command(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, dataset): configs/moe-demo.yaml trained 12 tiny steps by `python -m train`."""
    data = prepared_dataset(tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("moe") / "run"
    overrides = [o for o in TINY if not o.startswith(("model.family", "model.bias", "model.tie_embeddings"))]
    r = command(
        "-m",
        "train",
        "--config",
        "configs/moe-demo.yaml",
        *overrides,
        *MOE,
        f"data.dir={data}",
        f"train.run_dir={run_dir}",
        "train.max_steps=12",
        "logging.log_every=4",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, data


def test_training_logs_routing_health_and_saves_the_moved_bias(trained):
    run_dir, _ = trained
    logs = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in logs] == [4, 8, 12]
    for block in (0, 1):
        keys = [f"moe/{block}/{k}" for k in ("max_share", "min_share", "balance_loss", "z_loss", "bias_range")]
        for r in logs:
            assert all(k in r for k in keys), sorted(r)
            assert 0 <= r[f"moe/{block}/min_share"] <= 0.25 <= r[f"moe/{block}/max_share"] <= 1
            assert r[f"moe/{block}/balance_loss"] > 0 and r[f"moe/{block}/z_loss"] > 0
        assert logs[-1][f"moe/{block}/bias_range"] > 0  # the bias moved, by 0.01 a step
    model, _ = load_model(run_dir)
    bias = model.transformer.h[0].mlp.expert_bias
    assert bias.abs().sum() > 0 and bias.abs().max() <= 12 * 0.01 + 1e-6


def test_kv_cache_generation_and_batching_equal_the_no_cache_reference(trained):
    model, _ = load_model(trained[0])
    be = TorchBackend(model.eval(), {"tokenizer": "bytes"})
    prompts = [list(b"def main("), list(b"import"), list(b"x")]
    cached = generate(be, prompts, 16, temperature=0)
    for prompt, got in zip(prompts, cached, strict=True):
        assert got == generate_no_cache(be.forward, prompt, 16, be.block_size)


def test_sample_and_evaluate_commands_read_the_checkpoint(trained):
    run_dir, data = trained
    r = command("-m", "eval.sample", "--ckpt", str(run_dir), "--prompt", "def ", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.startswith("def "), r.stderr[-2000:]
    r = command("-m", "eval.evaluate", "--ckpt", str(run_dir), "--data", str(data), "--max-batches", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    loss = json.loads(r.stdout)["loss"]
    assert 0 < loss < 5.6  # below the uniform 257-way loss (ln 257 = 5.55) after 12 steps


def test_the_server_completes_greedily_as_the_reference(trained):
    require_extra("fastapi", "serve")
    from fastapi.testclient import TestClient

    from data.tokenizer import get_tokenizer
    from eval.serve.app import create_app
    from eval.serve.batching import Engine
    from eval.serve.protocol import Server

    model, _ = load_model(trained[0])
    model.eval()
    enc = get_tokenizer("bytes")
    server = Server(Engine(model, max_batch=4).start(), enc, "moe")
    try:
        with TestClient(create_app(server)) as c:
            r = c.post("/v1/completions", json={"prompt": "def ", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200
            text = r.json()["choices"][0]["text"]
    finally:
        server.engine.stop()
    toks = generate_no_cache(lambda x: model(x), enc.encode("def "), 8, model.config.block_size)
    if enc.eot_token in toks:
        toks = toks[: toks.index(enc.eot_token)]
    assert text == enc.decode(toks)


@pytest.mark.parametrize(
    "fmt, msg",
    [
        ("int8", "error: int8 quantization does not cover mixture-of-experts weights"),
        ("onnx", "error: ONNX export does not support mixture-of-experts blocks"),
    ],
)
def test_int8_and_onnx_exports_refuse_in_one_line(trained, tmp_path, fmt, msg):
    r = command("-m", "eval.export", "--ckpt", str(trained[0]), "--format", fmt, "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith(msg) and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_int8_backend_refuses_in_one_line(trained):
    r = command("-m", "eval.sample", "--ckpt", str(trained[0]), "--backend", "int8", "--prompt", "a")
    assert r.returncode == 2 and "int8 quantization does not cover mixture-of-experts" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resume_continues_exactly_with_the_saved_routing_bias(tmp_path_factory, tmp_path):
    """4 steps straight, or 2 then a resume to 4: the same losses, routing health and biases (the bias
    is a buffer of the saved weights; the step's load counts start afresh after every step)."""
    from train_helpers import tiny_config

    from train.loop import run

    data = prepared_dataset(tmp_path_factory)
    extra = [*MOE, "checkpoint.every=2", "checkpoint.keep_last=2", "schedule.total_steps=4"]
    run(tiny_config(data, tmp_path / "straight", *extra, "train.max_steps=4"), log=lambda *a: None)
    run(tiny_config(data, tmp_path / "cut", *extra, "train.max_steps=2"), log=lambda *a: None)
    run(tiny_config(data, tmp_path / "cut", *extra, "train.max_steps=4"), log=lambda *a: None)

    def logged(run_dir):
        return [{k: v for k, v in r.items() if k == "loss" or k.startswith("moe/")} for r in metrics(run_dir)[-2:]]

    assert logged(tmp_path / "straight") == logged(tmp_path / "cut")
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "cut")
    for block in range(2):
        bias = a.transformer.h[block].mlp.expert_bias
        assert bias.abs().sum() > 0 and torch.equal(bias, b.transformer.h[block].mlp.expert_bias)
