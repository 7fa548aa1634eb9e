"""eval.hf / model.hf for the modern family <-> transformers' LlamaForCausalLM, both directions.

Small random Llamas are built with transformers (no download); logits must agree within 1e-4 (fp32)
with grouped-query attention and an untied head, and greedy continuations must be the same tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import require_extra

transformers = require_extra("transformers", "hf")

from _eval_fixtures import tiny_random  # noqa: E402

from eval.cli import run  # noqa: E402
from eval.generate import generate_no_cache  # noqa: E402
from eval.hf import export_hf, import_hf, main  # noqa: E402
from model.gpt import apply_rope, rope_tables  # noqa: E402
from model.io import load_model  # noqa: E402

LLAMA = dict(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA 4:2
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,  # not the default, so a dropped theta shows
    tie_word_embeddings=False,
    initializer_range=0.1,  # larger than the default so logits differ clearly between tokens
)


def hf_llama(**overrides):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**LLAMA, **overrides})
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(n: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (2, n), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_rope_is_hf_llama_rotate_half():
    """Our apply_rope with our tables equals transformers' apply_rotary_pos_emb with LlamaRotaryEmbedding."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from model import ModelConfig

    hf_cfg = transformers.LlamaConfig(**LLAMA)
    ours = ModelConfig(family="modern", n_layer=1, n_head=4, n_kv_head=2, n_embd=64, block_size=64, rope_theta=50000.0)
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    pos = torch.arange(10)[None].expand(2, -1)
    cos_hf, sin_hf = LlamaRotaryEmbedding(hf_cfg)(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = rope_tables(ours)
    rope = (cos[:10][None, None], sin[:10][None, None])
    torch.testing.assert_close(apply_rope(q, *rope), q_hf, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(k, *rope), k_hf, atol=1e-6, rtol=0)


def test_import_sharded_llama(tmp_path):
    hf = hf_llama()
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir, max_shard_size="100KB")
    assert (hf_dir / "model.safetensors.index.json").is_file() and not (hf_dir / "model.safetensors").exists()
    art = import_hf(hf_dir, tmp_path / "ours", tokenizer="bytes")
    ours, meta = load_model(art)
    assert ours.config.family == "modern" and ours.config.n_kv_head == 2 and not ours.config.tie_embeddings
    assert ours.config.rope_theta == 50000.0 and meta["tokenizer"] == "bytes"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    prompt = x[0, :5].tolist()
    assert generate_no_cache(lambda t: ours(t), prompt, 20, 64) == hf_greedy(hf, prompt, 20)


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_as_llama(tmp_path, tied):
    art = tiny_random(tmp_path / "m", family="modern", tie_embeddings=tied, seed=1, rope_theta=20000.0)
    out = export_hf(art, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model(art)
    x = ids(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)
    prompt = x[1, :4].tolist()
    assert hf_greedy(hf, prompt, 20) == generate_no_cache(lambda t: ours(t), prompt, 20, 64)
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the bytes tokenizer as GPT-2 BPE files
    assert tok.encode("héllo") == list("héllo".encode())


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tmp_path, tied):
    hf = hf_llama(tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "a")
    art = import_hf(tmp_path / "a", tmp_path / "ours", tokenizer="bytes")
    export_hf(art, tmp_path / "b")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "change, named",
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"sliding_window": 32}, "sliding_window"),
        ({"head_dim": 32}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_refuses_what_we_lack(tmp_path, capsys, change, named):
    hf_llama().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    if named == "rope_scaling":  # the transformers < 5 spelling, as most hub configs have it
        cfg.pop("rope_parameters", None)
    path.write_text(json.dumps({**cfg, **change}))
    capsys.readouterr()  # save_pretrained's progress bar
    assert run(main, ["import", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not (tmp_path / "out").exists()
