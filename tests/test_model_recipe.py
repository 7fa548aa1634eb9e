"""The recipe switches of ModelConfig (docs/model.md): QK-norm, ReLU^2 MLP, zero-initialised output
projections, logit soft-capping, document masking with position restarts; their KV-cache decoding, and
what the Hugging Face and ONNX exports do with them. Tiny models, seconds in all."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import require_extra

from model import GPT, KVCache, ModelConfig
from model.gpt import document_ids, document_positions

EOT = 96  # the tiny vocabulary's last id stands for <|endoftext|>
ALL = dict(qk_norm=True, mlp="relu2", logit_softcap=3.0)


def tiny(family: str = "gpt2", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, family=family)
    if family == "modern":
        base.update(n_kv_head=2, bias=False, tie_embeddings=False)
    return GPT(ModelConfig(**{**base, **kw})).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    """(B, T) random ids without EOT."""
    return torch.randint(0, EOT, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ config


def test_mlp_defaults_to_the_family_and_sets_the_width():
    assert ModelConfig().mlp == "gelu" and ModelConfig(family="modern").mlp == "swiglu"
    assert ModelConfig(mlp="relu2").hidden_dim == 4 * 768
    assert ModelConfig(family="modern", mlp="relu2").hidden_dim == 4 * 768
    assert ModelConfig(mlp="swiglu").hidden_dim == 2048  # ~8/3 * 768, rounded to 64
    for bad, msg in (
        (dict(mlp="relu3"), "model.mlp must be one of gelu, swiglu, relu2"),
        (dict(logit_softcap=0.0), "logit_softcap must be > 0"),
        (dict(doc_positions_restart=True), "needs model.doc_mask"),
        (dict(eot_id=50257), r"eot_id must be in \[0, vocab_size\)"),
    ):
        with pytest.raises(ValueError, match=msg):
            ModelConfig(**bad)
    with pytest.raises(ValueError, match="needs model.eot_id"):
        GPT(ModelConfig(vocab_size=97, block_size=8, n_layer=1, n_head=2, n_embd=8, doc_mask=True))


def test_old_model_json_loads_with_switches_off():
    """A model.json written before the switches existed has none of their keys: all off."""
    new = ("mlp", "qk_norm", "zero_init_proj", "logit_softcap", "doc_mask", "doc_positions_restart", "eot_id")
    old = {k: v for k, v in ModelConfig(family="modern").to_dict().items() if k not in new}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.mlp, cfg.qk_norm, cfg.logit_softcap, cfg.doc_mask) == ("swiglu", False, None, False)


# ------------------------------------------------------------------ switches


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_qk_norm_makes_attention_blind_to_query_and_key_scale(family):
    """RMSNorm on q and k removes their scale: scaling the q and k rows of c_attn leaves the logits
    unchanged with qk_norm, and changes them without (so the test fails if the norm is missing)."""
    idx = tokens(2, 12)
    for qk_norm in (True, False):
        model = tiny(family, qk_norm=qk_norm, bias=False, norm_eps=1e-12)  # eps: the one scale it sees
        ref = model(idx)
        cfg = model.config
        rows = (cfg.n_head + cfg.n_kv_head) * cfg.head_dim  # q and k rows of the fused projection
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_attn.weight[:rows] *= 7.0
        if qk_norm:
            torch.testing.assert_close(model(idx), ref, atol=1e-5, rtol=1e-5)
        else:
            assert (model(idx) - ref).abs().max() > 1e-2


def test_relu2_mlp_is_squared_relu():
    model = tiny(mlp="relu2")
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.out_features == 4 * 32
    x = torch.randn(2, 5, 32)
    want = F.linear(F.relu(mlp.c_fc(x)) ** 2, mlp.c_proj.weight, mlp.c_proj.bias)
    torch.testing.assert_close(mlp(x), want)
    gelu = tiny(mlp="gelu").transformer.h[0].mlp
    gelu.load_state_dict(mlp.state_dict())
    assert (gelu(x) - want).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_zero_init_proj_blocks_start_as_identity_and_learn(family):
    model = tiny(family, zero_init_proj=True).train()
    projs = [b.attn.c_proj for b in model.transformer.h] + [b.mlp.c_proj for b in model.transformer.h]
    assert all(p.weight.abs().max() == 0 for p in projs)
    other = tiny(family).transformer.h[0].attn.c_proj.weight
    assert other.abs().max() > 0  # off by default
    idx = tokens(2, 10)
    x = model.transformer.wte(idx)
    if family == "gpt2":
        x = x + model.transformer.wpe(torch.arange(10))
    torch.testing.assert_close(model(idx), model.head(model.transformer.ln_f(x)))  # blocks are the identity
    model(idx, idx).backward()
    assert all(p.weight.grad.abs().max() > 0 for p in projs)  # the residual branches still learn


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_logit_softcap_in_logits_and_loss(family):
    idx, targets = tokens(2, 10), tokens(2, 10, seed=2)
    plain = tiny(family)
    with torch.no_grad():
        plain.lm_head.weight.mul_(200.0)  # logits far beyond the cap
    capped = tiny(family, logit_softcap=2.0)
    capped.load_weights(plain.state_dict())
    raw = plain(idx)
    assert raw.abs().max() > 4.0
    logits = capped(idx)
    assert logits.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    loss = capped(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    assert not torch.isclose(loss, plain(idx, targets))


@pytest.mark.parametrize("family", ["gpt2", "modern"])
@pytest.mark.parametrize("switches", [ALL, dict(ALL, zero_init_proj=True, doc_mask=True, eot_id=EOT)])
def test_cached_decode_equals_full_forward(family, switches):
    """KV-cache decoding (prefill, then one token at a time) gives the full forward's logits."""
    model = tiny(family, **switches)
    with torch.no_grad():  # zero-init projections would make every position alike
        for p in model.parameters():
            if p.dim() == 2 and p.abs().max() == 0:
                p.normal_(0, 0.05)
    idx = tokens(2, 14)
    idx[:, 0] = EOT  # a window that opens a document (how prompts are framed) is one document
    full = model(idx)
    cache = KVCache(model.config, batch_size=2)
    steps = [model(idx[:, :6], kv_cache=cache, start_pos=0)]
    steps += [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ document masking


def test_document_ids_and_positions_convention():
    """EOT opens the document it precedes (modded-nanogpt's cumsum convention); positions restart there."""
    idx = torch.tensor([[5, 6, EOT, 7, 8, EOT, 9]])
    assert document_ids(idx, EOT).tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert document_positions(idx, EOT).tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert document_positions(idx, EOT, start_pos=3).tolist() == [[3, 4, 0, 1, 2, 0, 1]]


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_doc_mask_hides_the_previous_document(family):
    """The second document's logits do not depend on the first one's tokens with doc_mask, and do
    without it."""
    a = tokens(1, 20)
    a[0, 9] = EOT
    b = a.clone()
    b[0, :9] = tokens(1, 9, seed=5)  # another previous document
    for doc_mask in (True, False):
        model = tiny(family, doc_mask=doc_mask, eot_id=EOT)
        diff = (model(a)[0, 9:] - model(b)[0, 9:]).abs().max()
        assert (diff < 1e-6) if doc_mask else (diff > 1e-4)
        assert (model(a)[0, :9] - model(b)[0, :9]).abs().max() > 1e-4  # the first document differs


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_positions_restart_make_a_document_equal_to_itself_alone(family):
    """With doc_positions_restart a document mid-window gives the logits it gives at the window's start
    (learned positions and RoPE both restart)."""
    window = tokens(2, 24)
    window[:, 10] = EOT
    doc = window[:, 10:]
    model = tiny(family, doc_mask=True, doc_positions_restart=True, eot_id=EOT)
    torch.testing.assert_close(model(window)[:, 10:], model(doc), atol=1e-5, rtol=1e-5)
    pos, _, _ = model.window(window)
    assert pos[0, 10:].tolist() == list(range(14))
    no_restart = tiny(family, doc_mask=True, eot_id=EOT)
    assert no_restart.window(window)[0].tolist() == list(range(24))
    if family == "gpt2":  # learned absolute positions: without the restart the document differs
        assert (no_restart(window)[:, 10:] - no_restart(doc)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_flex_attention_path_equals_sdpa_mask(family):
    """The FlexAttention BlockMask (used on CUDA) and the boolean SDPA mask give the same logits; on CPU
    flex runs uncompiled here."""
    model = tiny(family, doc_mask=True, doc_positions_restart=True, eot_id=EOT, **ALL)
    idx = tokens(2, 32)
    idx[0, [3, 17]] = EOT
    idx[1, 25] = EOT
    outs = []
    torch.set_grad_enabled(False)  # FlexAttention has no CPU backward (torch 2.13); CUDA trains with it
    for flex in (False, True):
        pos, mask, is_causal = model.window(idx, flex=flex)
        assert isinstance(mask, torch.Tensor) != flex
        outs.append(model.head(model.trunk(idx, pos, None, mask, is_causal)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], model(idx))
    torch.set_grad_enabled(True)


def test_generation_with_doc_mask():
    """Cached generation with doc_mask and position restarts, for prompts with an <|endoftext|> inside
    them (one left-padded), gives the tokens of the no-cache forward, which applies the mask: the text
    after the EOT does not see the text before it. The same weights without the mask give other tokens."""
    from eval.backends import TorchBackend
    from eval.generate import generate, generate_no_cache

    prompts = [
        [*tokens(1, 6, seed=3)[0].tolist(), EOT, *tokens(1, 4, seed=4)[0].tolist()],
        [*tokens(1, 2, seed=5)[0].tolist(), EOT, *tokens(1, 3, seed=6)[0].tolist()],
    ]
    model = tiny(doc_mask=True, doc_positions_restart=True, eot_id=EOT, **ALL)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)  # a lively model: tokens depend on the context
    plain = tiny(**ALL)
    plain.load_weights(model.state_dict())
    want = [generate_no_cache(lambda x: model(x), p, 12, 32) for p in prompts]
    assert all(w != generate_no_cache(lambda x: plain(x), p, 12, 32) for w, p in zip(want, prompts, strict=True))
    be = TorchBackend(model, {"tokenizer": "bytes"})
    assert generate(be, prompts, max_new_tokens=12, temperature=0.0) == want  # a left-padded batch
    assert generate(be, prompts[:1], max_new_tokens=12, temperature=0.0) == want[:1]


def test_training_fills_eot_id_from_the_dataset():
    from train.config import Config
    from train.dataset import build_model_config

    cfg = Config()
    cfg.model = ModelConfig(vocab_size=None, doc_mask=True)
    mcfg, _ = build_model_config(cfg, {"vocab_size": 257, "eot_id": 256, "tokenizer": "bytes"})
    assert (mcfg.vocab_size, mcfg.eot_id) == (257, 256)
    cfg.model = ModelConfig(vocab_size=None)
    assert build_model_config(cfg, {"vocab_size": 257, "eot_id": 256, "tokenizer": "bytes"})[0].eot_id is None


# ------------------------------------------------------------------ interop


@pytest.mark.parametrize(
    "family, switch, msg",
    [
        ("gpt2", dict(qk_norm=True), "model.qk_norm .* has no Hugging Face GPT2LMHeadModel equivalent"),
        ("gpt2", dict(logit_softcap=30.0), "model.logit_softcap=30.0 .* has no Hugging Face GPT2"),
        ("gpt2", dict(mlp="swiglu"), "model.mlp=swiglu has no Hugging Face GPT2LMHeadModel equivalent"),
        ("modern", dict(qk_norm=True), "model.qk_norm .* has no Hugging Face LlamaForCausalLM"),
        ("modern", dict(logit_softcap=15.0), "model.logit_softcap=15.0 .* LlamaForCausalLM"),
        ("modern", dict(mlp="relu2"), "model.mlp=relu2 has no Hugging Face LlamaForCausalLM equivalent"),
    ],
)
def test_hf_export_refuses_what_it_cannot_express(tmp_path, capsys, family, switch, msg):
    from eval.cli import run
    from eval.hf import main
    from model.io import save_artifact

    model = tiny(family, **switch)
    save_artifact(tmp_path / "art", model, model.config, {"tokenizer": "bytes"})
    assert run(main, ["export", str(tmp_path / "art"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(msg, err), err
    assert not (tmp_path / "hf").exists()


def test_hf_gpt2_relu2_round_trip():
    """relu2 is GPT2Config's activation_function 'relu2' (transformers' ReLUSquaredActivation)."""
    transformers = require_extra("transformers", "hf")
    from model.hf import config_from_hf, config_to_hf, from_hf_state_dict, to_hf_state_dict

    model = tiny(mlp="relu2", doc_mask=True, eot_id=EOT)
    hf_cfg = config_to_hf(model.config)
    assert hf_cfg["activation_function"] == "relu2"
    assert config_from_hf(hf_cfg).mlp == "relu2"
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg)).eval()
    sd = to_hf_state_dict(model.state_dict(), model.config)
    hf.load_state_dict(sd, strict=False)
    idx = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=1e-4)
    back = GPT(config_from_hf(hf_cfg)).eval()
    back.load_weights(from_hf_state_dict(hf.state_dict(), back.config))
    torch.testing.assert_close(back(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_onnx_full_graph_has_every_switch(tmp_path):
    """The full-sequence ONNX graph computes GPT.forward with all switches, document masking included.
    (The decoder graph is GPT.trunk and GPT.head with the cache path's mask, checked in test_onnx.py.)"""
    require_extra("onnxruntime", "onnx")
    from model.onnx_export import export_full, session

    model = tiny("modern", doc_mask=True, doc_positions_restart=True, eot_id=EOT, **ALL)
    full = export_full(model, tmp_path / "full.onnx")
    idx = tokens(2, 20)
    idx[0, [4, 11]] = EOT
    (got,) = session(full).run(None, {"tokens": idx.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(idx), atol=1e-4, rtol=1e-4)


def test_int8_quantization_keeps_the_switches():
    """model/quantize.py swaps the Linears only: the soft-cap and QK-norm stay in the int8 forward.
    The head is scaled so that the cap binds (raw logits far past it): the int8 logits are
    cap * tanh(raw / cap) of the int8 model's uncapped logits. Scaling the q and k rows of c_attn (which
    per-row int8 scales carry exactly) leaves the int8 logits unchanged with QK-norm and changes them
    without it."""
    from model.quantize import quantize_model

    cap = ALL["logit_softcap"]
    idx = tokens(2, 16)
    idx[0, 7] = EOT

    def int8(qk_scale: float = 1.0, **kw) -> GPT:
        model = tiny("modern", doc_mask=True, eot_id=EOT, norm_eps=1e-12, **{**ALL, **kw})
        cfg = model.config
        with torch.no_grad():
            model.lm_head.weight.mul_(200.0)
            for block in model.transformer.h:
                block.attn.c_attn.weight[: (cfg.n_head + cfg.n_kv_head) * cfg.head_dim] *= qk_scale
        return quantize_model(model, kernel="dequant")

    with torch.no_grad():
        got = int8()(idx)
        raw = int8(logit_softcap=None)(idx)
        assert raw.abs().max() > 4 * cap  # the cap binds
        torch.testing.assert_close(got, cap * torch.tanh(raw / cap), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(int8(qk_scale=7.0)(idx), got, atol=1e-4, rtol=1e-4)
        no_norm = int8(qk_norm=False)(idx)
        assert (int8(qk_scale=7.0, qk_norm=False)(idx) - no_norm).abs().max() > 1e-2


def test_resume_accepts_a_checkpoint_from_before_the_switches(tmp_path):
    """A train_state.pt written before these fields existed lacks their keys: they were off, so the
    resume check passes; a switch that differs is still refused."""
    from train.checkpoint import CheckpointManager, TrainState
    from train.errors import TrainError

    new = ("mlp", "qk_norm", "zero_init_proj", "logit_softcap", "doc_mask", "doc_positions_restart", "eot_id")
    cfg = ModelConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=8)
    old = TrainState(model_config={k: v for k, v in cfg.to_dict().items() if k not in new})
    CheckpointManager(tmp_path, None, cfg).check_same_model(tmp_path, old)
    with pytest.raises(TrainError, match="qk_norm: False -> True"):
        CheckpointManager(tmp_path, None, ModelConfig(**{**cfg.to_dict(), "qk_norm": True})).check_same_model(
            tmp_path, old
        )
