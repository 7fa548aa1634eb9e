"""python -m eval.hf: a transformers GPT-2 directory -> our artifact -> a transformers directory, same logits."""

import json

import pytest
import torch

from eval.cli import run
from eval.hf import main
from model.io import load_model

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def hf_model(tie: bool):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_import_then_export_round_trip(tmp_path, tie):
    hf = hf_model(tie)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        ref = hf(idx).logits

    assert run(main, ["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours, meta = load_model(tmp_path / "ours")
    assert meta["tokenizer"] == "gpt2" and ours.config.tie_embeddings is tie
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref, atol=1e-5, rtol=0)

    assert run(main, ["export", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ref, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["n_layer"] == 2


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(main, ["import", str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "empty" / "config.json").write_text(json.dumps(hf_model(True).config.to_dict()))
    assert run(main, ["import", str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "no model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert run(main, ["export", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_modern_family_cannot_export(tmp_path, capsys):
    from _eval_fixtures import tiny_random

    art = tiny_random(tmp_path / "m", family="modern")
    assert run(main, ["export", str(art), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "GPT-2 family" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
