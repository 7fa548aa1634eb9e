"""eval/'s error contract: a user error (model.errors.UserError) is one line on stderr and exit 2; a bug
(any other exception) keeps its traceback. Each user mistake below is raised as a UserError where it is
detected, so that it does not depend on run() swallowing builtin exceptions."""

import json
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from _eval_fixtures import REPO, tiny_random
from safetensors.torch import save_file

from eval import evaluate, export, hf, plot, sample
from eval.cli import UsageError, dtype_flag, run
from model.errors import UserError


def fails_with(capsys, main, argv, needle: str) -> None:
    assert run(main, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("bug", [ValueError("x"), OSError(2, "No such file"), KeyError("k"), TypeError("t")])
def test_a_bug_keeps_its_traceback(bug):
    def main(argv):
        raise bug

    with pytest.raises(type(bug)):
        run(main, [])


def test_a_user_error_is_one_line_and_exit_2(capsys):
    def main(argv):
        raise UsageError("the flag is wrong; pass another")

    assert run(main, []) == 2
    assert capsys.readouterr().err == "error: the flag is wrong; pass another\n"


def test_dtype_names_come_from_the_one_table():
    assert dtype_flag("bfloat16") == dtype_flag("BF16") == "bf16" and dtype_flag("float32") == "fp32"
    with pytest.raises(UsageError, match="--dtype: unknown dtype 'bf17'; use one of float32, bfloat16"):
        dtype_flag("bf17")


@pytest.mark.parametrize(
    "main, extra", [(sample.main, []), (evaluate.main, ["--data", "."])], ids=["sample", "evaluate"]
)
def test_bad_dtype_flag(capsys, tmp_path, main, extra):
    fails_with(capsys, main, ["--ckpt", tmp_path, *extra, "--dtype", "half-ish"], "unknown dtype")


def test_sample_prompt_file_that_is_not_text(tmp_path):
    path = tmp_path / "p.bin"
    path.write_bytes(b"\xff\xfe\x00\x9f")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        sample.read_prompts(Namespace(prompt=None, prompt_file=str(path)))
    with pytest.raises(UsageError, match="cannot read --prompt-file"):
        sample.read_prompts(Namespace(prompt=None, prompt_file=str(tmp_path / "missing.txt")))


def test_missing_checkpoint_is_a_user_error(capsys, tmp_path):
    fails_with(capsys, sample.main, ["--ckpt", tmp_path / "nope", "--prompt", "x"], "nope")


def test_export_to_a_file_or_over_an_existing_export(capsys, tmp_path):
    art = tiny_random(tmp_path / "m")
    (tmp_path / "f").write_text("a file")
    fails_with(capsys, export.main, ["--ckpt", art, "--format", "pt2", "--out", tmp_path / "f"], "is a file")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "model.pt2").write_text("an earlier export")
    fails_with(capsys, export.main, ["--ckpt", art, "--format", "pt2", "--out", tmp_path / "e"], "pass --force")
    assert (tmp_path / "e" / "model.pt2").read_text() == "an earlier export"


def test_a_rejected_export_leaves_no_file_and_no_staging_directory(capsys, tmp_path, monkeypatch):
    art = tiny_random(tmp_path / "m")
    monkeypatch.setattr(export, "PT2_ATOL", -1.0)  # no program can pass: the check must reject it
    fails_with(capsys, export.main, ["--ckpt", art, "--format", "pt2", "--out", tmp_path / "x"], "export rejected")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # neither x/model.pt2 nor .x.tmp-*


def hf_dir(tmp_path, config: dict):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file({"transformer.wte.weight": torch.zeros(4, 2)}, str(d / "model.safetensors"))
    return d


def test_hf_import_of_a_model_that_does_not_convert(capsys, tmp_path):
    d = hf_dir(tmp_path, {"model_type": "llama"})
    fails_with(capsys, hf.main, ["import", d, tmp_path / "out"], "does not convert")
    assert not (tmp_path / "out").exists()


def test_hf_import_over_an_existing_output_needs_force(capsys, tmp_path):
    d = hf_dir(tmp_path, {"model_type": "gpt2"})
    (tmp_path / "out").mkdir()
    fails_with(capsys, hf.main, ["import", d, tmp_path / "out"], "already exists; pass --force")


def test_hf_sharded_index_without_weight_map(capsys, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "model.safetensors.index.json").write_text("{}")
    fails_with(capsys, hf.main, ["import", d, tmp_path / "out"], "is not a safetensors index")


def test_plot_errors_are_usage_errors(capsys, tmp_path):
    assert issubclass(plot.PlotError, UserError)
    fails_with(capsys, plot.main, [tmp_path], "metrics.jsonl not found")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    fails_with(capsys, plot.main, [tmp_path, "--out", tmp_path], "is a directory")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval.sample", "--ckpt", "no/such/run", "--prompt", "x"], "no/such/run"),
        (["eval.plot", "no/such/run"], "metrics.jsonl not found"),
    ],
)
def test_cli_process_prints_one_line_and_exits_2(argv, needle):
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
