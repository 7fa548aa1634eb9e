"""python -m eval.hf: a transformers GPT-2 directory -> our artifact -> a transformers directory, same logits."""

import json

import pytest
import torch
from conftest import require_extra

from eval.cli import run
from eval.hf import main
from model.io import load_model

transformers = require_extra("transformers", "hf")


def hf_model(tie: bool):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=101,
        n_positions=32,
        n_embd=48,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
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


def test_biased_modern_family_cannot_export(tmp_path, capsys):
    """The modern family exports as LlamaForCausalLM (tests/test_hf_llama.py), but not with biases."""
    from _eval_fixtures import tiny_random

    art = tiny_random(tmp_path / "m", family="modern", bias=True)
    assert run(main, ["export", str(art), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model.bias: false" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec", ["gpt2", "bytes"])
def test_export_writes_a_tokenizer_that_encodes_like_ours(tmp_path, spec):
    """The exported vocab.json + merges.txt give transformers' GPT-2 tokenizers our token ids."""
    import inspect

    from data.tokenizer import get_tokenizer
    from model import GPT, ModelConfig
    from model.io import save_artifact

    enc = get_tokenizer(spec)
    cfg = ModelConfig(vocab_size=enc.n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=8)
    art = save_artifact(tmp_path / "ours", GPT(cfg), cfg, {"tokenizer": spec})
    assert run(main, ["export", str(art), str(tmp_path / "hf")]) == 0
    text = inspect.getsource(json) + " naïve café 日本語 🤖\n\n\tx  y   z\r\n I'm can't we'll 123456 ...!!"
    for cls in (transformers.AutoTokenizer, transformers.GPT2TokenizerFast):
        tok = cls.from_pretrained(tmp_path / "hf")
        assert tok.encode(text) == enc.encode_ordinary(text), cls
        assert tok.encode("a<|endoftext|>b") == enc.encode("a<|endoftext|>b", allowed_special="all")
        assert tok.decode(enc.encode_ordinary(text)) == text
    if spec == "gpt2":  # two facts of OpenAI's GPT-2 files: " the" is id 262, the first merge is "Ġ t"
        assert json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))["Ġthe"] == 262
        assert (tmp_path / "hf" / "merges.txt").read_text(encoding="utf-8").splitlines()[1] == "Ġ t"


def test_export_without_a_matching_tokenizer_writes_weights_only(tmp_path, capsys):
    from _eval_fixtures import tiny_random

    art = tiny_random(tmp_path / "m", vocab_size=101)  # tokenizer bytes (257 ids) != vocabulary 101
    assert run(main, ["export", str(art), str(tmp_path / "hf")]) == 0
    assert "no tokenizer files written" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
