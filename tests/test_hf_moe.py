"""eval.hf / model.hf_moe: MoE models <-> transformers' MixtralForCausalLM and Qwen3MoeForCausalLM.

Small random models built with transformers (no download): logits within 1e-4 (fp32) both ways, greedy
continuations the same tokens; what the HF classes cannot express is refused in one line naming it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_extra

transformers = require_extra("transformers", "hf")

from eval.cli import UsageError  # noqa: E402
from eval.generate import generate_no_cache  # noqa: E402
from eval.hf import export_hf, import_hf  # noqa: E402
from model import GPT, ModelConfig  # noqa: E402
from model.io import load_model, save_artifact  # noqa: E402

COMMON = dict(
    vocab_size=257,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=0.1,  # logits that differ clearly between tokens
    num_experts_per_tok=2,
)
MIXTRAL = dict(COMMON, intermediate_size=48, num_local_experts=4)
QWEN = dict(
    COMMON,
    num_hidden_layers=3,
    head_dim=16,
    intermediate_size=80,  # the dense block's
    moe_intermediate_size=32,
    num_experts=4,
    decoder_sparse_step=1,
    mlp_only_layers=[0],  # the first block dense: moe_first_dense=1
    norm_topk_prob=True,
)


def hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL)).eval()
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN)).eval()


def ids(n: int = 20) -> torch.Tensor:
    return torch.randint(0, 257, (2, n), generator=torch.Generator().manual_seed(0))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_import_gives_transformers_logits_and_greedy_tokens(tmp_path, kind):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(import_hf(tmp_path / "hf", tmp_path / "ours", tokenizer="bytes"))
    cfg = ours.config
    assert cfg.n_experts == 4 and cfg.moe_top_k == 2 and cfg.qk_norm == (kind == "qwen3_moe")
    if kind == "qwen3_moe":
        assert [type(b.mlp).__name__ for b in ours.transformer.h] == ["MLP", "MoE", "MoE"]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    prompt = [5, 17, 3, 88]
    assert generate_no_cache(lambda t: ours(t), prompt, 12, 64) == hf_greedy(hf, prompt, 12)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_export_loads_in_transformers_with_our_logits(tmp_path, kind):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    art = import_hf(tmp_path / "hf", tmp_path / "ours", tokenizer="bytes")
    ours, _ = load_model(art)
    with torch.no_grad():  # our own weights, so that the round trip is not the identity on HF's
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_artifact(tmp_path / "moved", ours, ours.config, {"tokenizer": "bytes"})
    out = export_hf(tmp_path / "moved", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == ("MixtralForCausalLM" if kind == "mixtral" else "Qwen3MoeForCausalLM")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), atol=1e-4, rtol=0)
    prompt = [9, 1, 200]
    assert hf_greedy(back, prompt, 12) == generate_no_cache(lambda t: ours(t), prompt, 12, 64)


BASE = dict(vocab_size=257, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, family="modern", bias=False)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(n_shared_experts=1), "model.n_shared_experts=1 (always-on shared experts) has no MixtralForCausalLM"),
        (dict(moe_router="sigmoid"), "model.moe_router=sigmoid has no MixtralForCausalLM equivalent"),
        (dict(moe_every=2), "dense blocks between MoE blocks (model.moe_every / moe_first_dense) have no Mixtral"),
        (dict(moe_route_scale=2.5, qk_norm=True), "model.moe_route_scale=2.5 (a routed-output scale) has no Qwen3Moe"),
        (dict(logit_softcap=30.0), "model.logit_softcap=30.0 (tanh logit capping) has no Hugging Face Mixtral"),
    ],
)
def test_what_the_hf_classes_cannot_express_is_refused_by_name(tmp_path, kw, msg):
    cfg = ModelConfig(**BASE, n_experts=4, **kw)
    art = save_artifact(tmp_path / "m", GPT(cfg), cfg, {"tokenizer": "bytes"})
    with pytest.raises(UsageError, match="^.*: " + msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        export_hf(art, tmp_path / "out")


def test_a_trained_routing_bias_is_refused_by_name(tmp_path):
    cfg = ModelConfig(**BASE, n_experts=4, moe_bias_update_rate=0.001)
    model = GPT(cfg)
    with torch.no_grad():
        model.transformer.h[1].mlp.expert_bias[0] = 0.01
    art = save_artifact(tmp_path / "m", model, cfg, {"tokenizer": "bytes"})
    with pytest.raises(UsageError, match="block 1 has a trained routing bias"):
        export_hf(art, tmp_path / "out")


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_transformers_5_fused_expert_tensors_import_too(kind):
    """transformers 5 holds experts fused in memory (experts.gate_up_proj, experts.down_proj under mlp.):
    its state_dict converts as the per-expert files do."""
    from model.hf_moe import moe_config_from_hf, moe_from_hf_state_dict

    hf = hf_model(kind)
    sd = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    cfg = moe_config_from_hf(hf.config.to_dict())
    ours = GPT(cfg).eval()
    ours.load_weights(moe_from_hf_state_dict(sd, cfg))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
