"""The eval CLIs end to end: sample, evaluate, export; user errors are one line and a non-zero exit."""

import io
import json
import math
import subprocess
import sys

import pytest
import torch
from _eval_fixtures import REPO, shared_trained
from conftest import fresh_interpreter

from eval import evaluate, export, sample
from eval.cli import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_trained(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_dir(trained, tmp_path_factory):
    art, _ = trained
    out = tmp_path_factory.mktemp("cli-export") / "onnx"
    assert run(export.main, ["--ckpt", str(art), "--format", "onnx", "--out", str(out)]) == 0
    return out


def cli(capsys, main, *argv) -> tuple[int, str, str]:
    rc = run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_sample_is_deterministic_per_seed(trained, capsys):
    art, _ = trained
    args = ["--ckpt", art, "--prompt", "def ", "--max-new-tokens", 40, "--temperature", 1.0, "--stop", ""]
    a = cli(capsys, sample.main, *args, "--seed", 1)
    b = cli(capsys, sample.main, *args, "--seed", 1)
    c = cli(capsys, sample.main, *args, "--seed", 2)
    assert a[0] == 0 and a[1] == b[1] and a[1] != c[1]
    assert a[1].startswith("def ") and len(a[1]) > 20


def test_sample_text_stop_and_no_echo(trained, capsys):
    """--no-echo drops the prompt and --stop cuts the text before the stop string: the output is exactly
    the unstopped continuation (same seed, same tokens) up to its first "e", and not empty."""
    art, _ = trained
    args = ["--ckpt", art, "--prompt", "The ", "--max-new-tokens", 60, "--seed", 0]
    rc, full, _ = cli(capsys, sample.main, *args, "--stop", "")
    assert rc == 0 and full.startswith("The ")
    continuation = full[len("The ") :]
    cut = continuation.find("e")
    assert cut > 0, f"seed 0 must give some text before an 'e' for this test to mean anything: {full!r}"
    rc, out, _ = cli(capsys, sample.main, *args, "--no-echo", "--stop", "e")
    assert rc == 0 and out == continuation[:cut] + "\n"


def test_sample_reads_stdin_and_batches_prompts(trained, capsys, monkeypatch):
    art, _ = trained
    monkeypatch.setattr(sys, "stdin", io.StringIO("import os\n"))
    rc, out, _ = cli(capsys, sample.main, "--ckpt", art, "--max-new-tokens", 10, "--temperature", 0)
    assert rc == 0 and out.startswith("import os\n")
    rc, out, _ = cli(
        capsys,
        sample.main,
        "--ckpt",
        art,
        "--prompt",
        "a",
        "--prompt",
        "class Foo",
        "--max-new-tokens",
        10,
        "--temperature",
        0,
        "--num-samples",
        2,
    )
    assert rc == 0 and out.count("=== prompt") == 4
    assert "=== prompt 2, sample 2 ===\nclass Foo" in out


def test_onnx_sampling_matches_torch_greedy(trained, onnx_dir, capsys):
    art, _ = trained
    common = ["--prompt", "def main(", "--max-new-tokens", 30, "--temperature", 0]
    rc_t, out_t, _ = cli(capsys, sample.main, "--ckpt", art, *common)
    rc_o, out_o, _ = cli(capsys, sample.main, "--backend", "onnx", "--onnx", onnx_dir, *common)
    assert rc_t == rc_o == 0 and out_t == out_o and len(out_t) > len("def main(")


def test_user_errors_are_one_line(trained, tmp_path, capsys):
    art, _ = trained
    one_line_error(*cli(capsys, sample.main, "--ckpt", tmp_path / "nope", "--prompt", "x")[::2], "does not exist")
    one_line_error(*cli(capsys, sample.main, "--ckpt", art, "--backend", "tpu")[::2], "unknown backend 'tpu'")
    rc, _, err = cli(capsys, sample.main, "--ckpt", art, "--prompt", "x" * 100)
    one_line_error(rc, err, "context is 64")
    rc, out, _ = cli(capsys, sample.main, "--ckpt", art, "--prompt", "x" * 100, "--crop-prompt", "--max-new-tokens", 5)
    assert rc == 0
    one_line_error(*cli(capsys, sample.main, "--backend", "onnx")[::2], "--onnx")
    one_line_error(*cli(capsys, sample.main, "--ckpt", art, "--top-p", 1.5)[::2], "--top-p")


def test_sample_goes_on_past_the_context(trained, capsys):
    """--max-new-tokens beyond the 64-token context: all of them come (bytes: one character each), no note."""
    art, _ = trained
    args = ["--ckpt", art, "--prompt", "def ", "--max-new-tokens", 150, "--temperature", 0, "--stop", "", "--no-echo"]
    rc, out, err = cli(capsys, sample.main, *args)
    assert rc == 0 and err == ""
    assert len(out[:-1].encode("utf-8", errors="replace")) >= 150 - 4  # a few bytes may be one U+FFFD


@pytest.mark.parametrize("flags,imported", [((), False), (("--compile",), True)])
def test_sample_imports_the_compiler_only_for_compile(trained, flags, imported):
    """torch._dynamo and sympy (torch.fx's symbolic shapes) are large imports: a plain sample, its
    checkpoint load included, does without them; --compile needs them."""
    art, _ = trained
    argv = ["--ckpt", str(art), "--prompt", "a", "--max-new-tokens", "1", *flags]
    heavy = ["sympy", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"]
    code = (
        "import sys\nfrom eval import sample\nfrom eval.cli import run\n"
        f"assert run(sample.main, {argv!r}) == 0\nprint([m for m in {heavy!r} if m in sys.modules])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=fresh_interpreter(), capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == str(heavy if imported else [])


def test_real_process_exit_code_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "eval.sample", "--ckpt", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "does not exist" in r.stderr


def test_evaluate_torch_int8_onnx(trained, onnx_dir, capsys):
    from data.loader import val_batches
    from model.io import load_model
    from model.loss import mean_loss

    art, data = trained
    base = ["--data", data, "--max-batches", 4, "--batch-size", 4, "--json"]
    results = {}
    for name, extra in {
        "torch": ["--ckpt", art],
        "int8": ["--ckpt", art, "--backend", "int8"],
        "onnx": ["--backend", "onnx", "--onnx", onnx_dir / "model.onnx"],
    }.items():
        rc, out, err = cli(capsys, evaluate.main, *base, *extra)
        assert rc == 0, err
        results[name] = json.loads(out)
    r = results["torch"]
    model, _ = load_model(art)
    batches = list(val_batches(data, seq_len=64, batch_size=4, max_batches=4))
    assert abs(r["loss"] - mean_loss(model, batches)) < 1e-6
    assert r["tokens"] == 4 * 4 * 64
    eot = sum(int((y == 256).sum()) for _, y in batches)  # <|endoftext|> is no text: 0 bytes
    assert r["bytes"] == r["tokens"] - eot
    assert math.isclose(r["bits_per_byte"], r["loss"] * r["tokens"] / math.log(2) / r["bytes"], rel_tol=1e-9)
    assert math.isclose(r["perplexity"], math.exp(r["loss"]), rel_tol=1e-9)
    assert abs(results["onnx"]["loss"] - r["loss"]) < 1e-4
    assert abs(results["int8"]["loss"] - r["loss"]) / r["loss"] < 0.01
    rc, out, _ = cli(capsys, evaluate.main, "--data", data, "--ckpt", art, "--max-batches", 2)
    assert rc == 0 and "bits/byte" in out and "perplexity" in out


def test_evaluate_refuses_a_dataset_of_another_tokenizer(trained, tmp_path, capsys):
    art, data = trained
    meta = json.loads((data / "meta.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    one_line_error(*cli(capsys, evaluate.main, "--ckpt", art, "--data", other)[::2], "tokenized with 'gpt2'")


def test_export_int8_artifact_and_pt2(trained, tmp_path, capsys):
    art, data = trained
    rc, out, err = cli(capsys, export.main, "--ckpt", art, "--format", "int8", "--data", data, "--out", tmp_path / "q")
    assert rc == 0, err
    assert "int8 check: val loss" in out and "wrote" in out
    assert json.loads((tmp_path / "q" / "model.json").read_text())["metadata"]["quantization"] == "int8"
    rc, out, _ = cli(capsys, sample.main, "--ckpt", tmp_path / "q", "--prompt", "def", "--max-new-tokens", 5)
    assert rc == 0 and out.startswith("def")
    rc, out, err = cli(capsys, export.main, "--ckpt", art, "--format", "pt2", "--out", tmp_path / "pt2")
    assert rc == 0 and (tmp_path / "pt2" / "model.pt2").is_file(), err
    ep = torch.export.load(str(tmp_path / "pt2" / "model.pt2"))
    assert ep.module()(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 257)


def test_failed_check_deletes_the_export(trained, tmp_path, capsys, monkeypatch):
    art, _ = trained
    monkeypatch.setattr(export, "PT2_ATOL", -1.0)  # no program can pass: the check must reject it
    rc, _, err = cli(capsys, export.main, "--ckpt", art, "--format", "pt2", "--out", tmp_path / "x")
    one_line_error(rc, err, "export rejected")
    assert not (tmp_path / "x" / "model.pt2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_export_errors(trained, tmp_path, capsys):
    art, _ = trained
    one_line_error(
        *cli(capsys, export.main, "--ckpt", art, "--format", "onnx", "--int8", "--out", tmp_path)[::2], "--data"
    )
    one_line_error(
        *cli(capsys, export.main, "--ckpt", art, "--format", "tflite", "--out", tmp_path)[::2], "unknown --format"
    )


def test_unreadable_onnx_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    one_line_error(*cli(capsys, sample.main, "--backend", "onnx", "--onnx", bad)[::2], "not an ONNX model")


def test_bench_runs_on_a_checkpoint(trained, capsys):
    """The bench prints numbers (nothing here is timed): a smoke run of the torch backends."""
    from eval import bench

    art, data = trained
    rc, out, err = cli(
        capsys,
        bench.main,
        "--models",
        "ckpt",
        "--ckpt",
        art,
        "--data",
        data,
        "--backends",
        "torch,int8,nocache",
        "--batch-sizes",
        "1,2",
        "--new-tokens",
        8,
        "--prefill-len",
        8,
        "--loss-batches",
        2,
    )
    assert rc == 0, err
    assert out.count("decode") >= 5 and "artifact int8" in out
    assert "[ok] int8 Linear weights" in out and "int8 val loss" in out
    assert "weight streaming at batch 1" in out and "KV-cache >= 10x the no-cache loop needs" in out
    # the step's floor and the step time the goal needs, from the same rounds
    assert "the step's matrix-vector products alone" in out and "that is a step of at most" in out
    assert "avx512_bf16/amx: " in out  # which CPU: speeds differ by whether it has bf16 units


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_device_cuda_without_a_gpu_is_one_line(capsys):
    from eval import bench

    one_line_error(*cli(capsys, bench.main, "--device", "cuda", "--models", "demo")[::2], "no CUDA device")
    one_line_error(*cli(capsys, bench.main, "--device", "tpu")[::2], "--device must be cpu or cuda")
