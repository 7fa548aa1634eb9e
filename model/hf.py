"""Hugging Face GPT-2 <-> our GPT-2 family: state dicts and configs.

HF's GPT2 uses Conv1D layers whose weights are stored (in, out), the transpose of
nn.Linear's (out, in); everything else maps one to one (names as in nanoGPT).
This needs no `transformers` import: it converts plain tensors and config dicts.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF buffers that are not weights (causal mask tables in older transformers releases).
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a GPT2Config dict (config.json)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"only GPT-2 checkpoints convert, got model_type={hf.get('model_type')!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {act!r} is not GPT-2's tanh GELU; this checkpoint does not convert")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        ffn_hidden=hf.get("n_inner"),
        family="gpt2",
        bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """GPT2Config kwargs for one of our GPT-2-family configs."""
    if cfg.family != "gpt2" or not cfg.bias:
        raise ValueError(
            "only the GPT-2 family with biases (model.family: gpt2, model.bias: true) "
            "has a Hugging Face GPT2LMHeadModel equivalent"
        )
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_ctx=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.hidden_dim,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=50256,
        eos_token_id=50256,
    )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT2LMHeadModel (or GPT2Model) state dict -> ours."""
    out = {}
    for k, v in hf_sd.items():
        if k.endswith(_HF_BUFFERS):
            continue
        name = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k  # GPT2Model lacks the prefix
        if name.endswith(_CONV1D):
            v = v.t()
        out[name] = v.contiguous()
    V = cfg.padded_vocab_size
    out["transformer.wte.weight"] = _pad_rows(out["transformer.wte.weight"], V)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    elif "lm_head.weight" in out:
        out["lm_head.weight"] = _pad_rows(out["lm_head.weight"], V)
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our GPT-2-family state dict -> HF GPT2LMHeadModel's (Conv1D weights transposed back)."""
    config_to_hf(cfg)  # raises for configs HF cannot express
    out = {}
    for k, v in sd.items():
        if k.endswith(_CONV1D):
            v = v.t()
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[: cfg.vocab_size]  # drop vocabulary padding rows
        out[k] = v.contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
