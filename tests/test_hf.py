"""Interop with Hugging Face transformers' GPT2LMHeadModel: same logits both ways."""

import pytest
import torch
from conftest import require_extra

from model import GPT
from model.hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_state_dict

transformers = require_extra("transformers", "hf")


def small_hf_model(tie: bool = True):
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


@pytest.mark.parametrize("pad", [1, 64])
def test_hf_to_ours_same_logits(pad):
    hf = small_hf_model()
    cfg = config_from_hf(hf.config.to_dict())
    cfg.pad_vocab_multiple = pad
    ours = GPT(cfg).eval()
    missing, unexpected = ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=0)


def test_ours_to_hf_same_logits():
    torch.manual_seed(1)
    hf_ref = small_hf_model()
    cfg = config_from_hf(hf_ref.config.to_dict())
    ours = GPT(cfg).eval()  # fresh random weights, not the HF ones
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=0)


def test_untied_head_round_trip():
    hf = small_hf_model(tie=False)
    cfg = config_from_hf(hf.config.to_dict())
    assert cfg.tie_embeddings is False
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    back = to_hf_state_dict(ours.state_dict(), cfg)
    want = hf.state_dict()
    assert sorted(back) == sorted(want)  # lm_head.weight included: the head is not the embedding
    for k, v in want.items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0, msg=k)
    assert not torch.equal(back["lm_head.weight"], back["transformer.wte.weight"])
    again = transformers.GPT2LMHeadModel(hf.config).eval()
    again.load_state_dict(back, strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, atol=0, rtol=0)


def test_modern_family_has_no_hf_gpt2_equivalent():
    from model import ModelConfig

    with pytest.raises(ValueError, match="GPT-2 family"):
        config_to_hf(ModelConfig(family="modern", n_layer=1, n_head=2, n_embd=8, vocab_size=10, block_size=8))
