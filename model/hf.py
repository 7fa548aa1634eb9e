"""Hugging Face GPT-2 <-> our GPT-2 family: state dicts and configs.

HF's GPT2 uses Conv1D layers whose weights are stored (in, out), the transpose of
nn.Linear's (out, in); everything else maps one to one (names as in nanoGPT).
This needs no `transformers` import: it converts plain tensors and config dicts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.config import ModelConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF buffers that are not weights (causal mask tables in older transformers releases).
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")


def check_switches(cfg: ModelConfig, arch: str, mlps: tuple[str, ...]) -> None:
    """Raise ValueError (one line) for a recipe switch `arch` cannot express, rather than write a model
    that computes something else. doc_mask passes: HF attends across
    <|endoftext|>, which is the same function on a window holding one document (docs/model.md)."""
    if cfg.mlp not in mlps:
        raise ValueError(f"model.mlp={cfg.mlp} has no {arch} equivalent (it has {' or '.join(mlps)})")
    if cfg.qk_norm:
        raise ValueError(f"model.qk_norm (RMSNorm on queries and keys) has no {arch} equivalent")
    if cfg.logit_softcap is not None:
        raise ValueError(f"model.logit_softcap={cfg.logit_softcap} (tanh logit capping) has no {arch} equivalent")


# Our MLP kinds <-> GPT2Config.activation_function (transformers' ACT2FN names; "relu2" is its
# ReLUSquaredActivation, So et al. 2021). gelu_pytorch_tanh is the same function as gelu_new.
_GPT2_ACTS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a GPT2Config dict (config.json)."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"only GPT-2 checkpoints convert, got model_type={hf.get('model_type')!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        raise ValueError(f"activation {act!r} is not GPT-2's tanh GELU (or relu2); this checkpoint does not convert")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        block_size=hf["n_positions"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        ffn_hidden=hf.get("n_inner"),
        family="gpt2",
        mlp=_GPT2_ACTS[act],
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
    check_switches(cfg, "Hugging Face GPT2LMHeadModel", ("gelu", "relu2"))
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
        activation_function="gelu_new" if cfg.mlp == "gelu" else cfg.mlp,
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


# ------------------------------------------------------------------------------------------------
# Hugging Face Llama <-> our modern family (RoPE, RMSNorm, SwiGLU, GQA).
#
# Both sides rotate halves in RoPE (x = [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin], HF's
# rotate_half) with the same frequencies theta^(-2i/d), so q/k weights map without the permutation
# Meta's original checkpoints need; tests/test_hf_llama.py checks logits against transformers.
# Our fused c_attn is [q | k | v] rows and c_fc is [gate | up] rows; HF keeps them as separate Linears.

# Llama features the modern family does not implement: importing them would change the function
# silently, so each is refused by name.
_LLAMA_REFUSED = {
    "attention_bias": "biases in q/k/v/o projections",
    "mlp_bias": "biases in the MLP projections",
}


def _rope_theta(hf: dict) -> float:
    """rope_theta from a config dict, refusing any RoPE scaling (transformers <5: rope_scaling; 5: rope_parameters)."""
    for key in ("rope_scaling", "rope_parameters"):
        rp = hf.get(key)
        if rp:
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                raise ValueError(
                    f"{key} of type {kind!r} (RoPE scaling) is not implemented in the modern family; "
                    "this checkpoint does not convert"
                )
    rp = hf.get("rope_parameters") or {}
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def llama_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig (family modern) from a LlamaConfig dict; refuses what the modern family lacks, one line each."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"expected a Llama config (model_type llama), got model_type={hf.get('model_type')!r}")
    for key, what in _LLAMA_REFUSED.items():
        if hf.get(key):
            raise ValueError(f"{key} is set ({what}); the modern family has none, so this checkpoint does not convert")
    if hf.get("sliding_window") or hf.get("use_sliding_window"):
        raise ValueError(
            "sliding_window attention is not implemented in the modern family; this checkpoint does not convert"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not SwiGLU's silu; this checkpoint does not convert")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_head != n_embd:
        raise ValueError(
            f"head_dim {head_dim} is not hidden_size / num_attention_heads ({n_embd} / {n_head}); "
            "the modern family derives it, so this checkpoint does not convert"
        )
    return ModelConfig(
        family="modern",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        ffn_hidden=hf["intermediate_size"],
        bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=_rope_theta(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )


def llama_config_to_hf(cfg: ModelConfig, eos_token_id: int | None = None) -> dict:
    """LlamaConfig kwargs (config.json) for one of our modern-family configs."""
    if cfg.family != "modern" or cfg.bias:
        raise ValueError(
            "only the modern family without biases (model.family: modern, model.bias: false) "
            "has a Hugging Face LlamaForCausalLM equivalent"
        )
    check_switches(cfg, "Hugging Face LlamaForCausalLM", ("swiglu",))
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # read by transformers < 5, vLLM and llama.cpp's converter
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        rope_scaling=None,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def _llama_names(i: int) -> list[tuple[str, str]]:
    """(ours, HF's) for the one-to-one weights of layer i."""
    o, h = f"transformer.h.{i}.", f"model.layers.{i}."
    return [
        (o + "ln_1.weight", h + "input_layernorm.weight"),
        (o + "attn.c_proj.weight", h + "self_attn.o_proj.weight"),
        (o + "ln_2.weight", h + "post_attention_layernorm.weight"),
    ]


def _llama_mlp_to_hf(i: int, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block i's dense SwiGLU MLP as HF's gate / up / down projections."""
    o, h = f"transformer.h.{i}.", f"model.layers.{i}."
    gate, up = sd[o + "mlp.c_fc.weight"].chunk(2)
    return {
        h + "mlp.gate_proj.weight": gate,
        h + "mlp.up_proj.weight": up,
        h + "mlp.down_proj.weight": sd[o + "mlp.c_proj.weight"],
    }


def llama_to_hf_state_dict(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    mlp: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Our modern-family state dict -> LlamaForCausalLM's (fused projections split, vocabulary padding dropped).
    Llama-like classes pass their own `mlp(block, sd)` and check their config themselves (model/hf_moe.py);
    with cfg.qk_norm the attention's q_norm / k_norm are written too (Qwen3's names)."""
    if mlp is None:
        llama_config_to_hf(cfg)
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    V = cfg.vocab_size
    out = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"][:V],
        "model.norm.weight": sd["transformer.ln_f.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    for i in range(cfg.n_layer):
        o, h = f"transformer.h.{i}.", f"model.layers.{i}."
        out.update({hk: sd[ok] for ok, hk in _llama_names(i)})
        wq, wk, wv = sd[o + "attn.c_attn.weight"].split([q, kv, kv])
        out.update(
            {h + "self_attn.q_proj.weight": wq, h + "self_attn.k_proj.weight": wk, h + "self_attn.v_proj.weight": wv}
        )
        if cfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = sd[o + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = sd[o + "attn.k_norm.weight"]
        out.update((mlp or _llama_mlp_to_hf)(i, sd))
    return {k: v.contiguous() for k, v in out.items()}


def _llama_mlp_from_hf(i: int, take: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block i's dense SwiGLU MLP from HF's gate / up / down projections."""
    o, h = f"transformer.h.{i}.", f"model.layers.{i}."
    return {
        o + "mlp.c_fc.weight": torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")]),
        o + "mlp.c_proj.weight": take(h + "mlp.down_proj.weight"),
    }


def llama_from_hf_state_dict(
    hf_sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    arch: str = "Llama",
    mlp: Callable[[int, Callable[[str], torch.Tensor]], dict[str, torch.Tensor]] = _llama_mlp_from_hf,
) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours. Missing or unexpected HF names raise, naming them. Llama-like
    classes (`arch`, e.g. Mixtral) reuse it with their own `mlp(block, take)` (model/hf_moe.py); with
    cfg.qk_norm the attention's q_norm / k_norm are read too (Qwen3's names)."""
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer in old files
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_sd:
            raise ValueError(f"the {arch} weights have no {name}; the files do not match config.json")
        used.add(name)
        return hf_sd[name]

    V = cfg.padded_vocab_size
    out = {
        "transformer.wte.weight": _pad_rows(take("model.embed_tokens.weight"), V),
        "transformer.ln_f.weight": take("model.norm.weight"),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _pad_rows(take("lm_head.weight"), V)
    elif "lm_head.weight" in hf_sd:
        used.add("lm_head.weight")  # a tied head saved anyway: the embedding is the weight
    for i in range(cfg.n_layer):
        o, h = f"transformer.h.{i}.", f"model.layers.{i}."
        out.update({ok: take(hk) for ok, hk in _llama_names(i)})
        attn = [take(h + f"self_attn.{p}_proj.weight") for p in "qkv"]
        out[o + "attn.c_attn.weight"] = torch.cat(attn)
        if cfg.qk_norm:
            out[o + "attn.q_norm.weight"] = take(h + "self_attn.q_norm.weight")
            out[o + "attn.k_norm.weight"] = take(h + "self_attn.k_norm.weight")
        out.update(mlp(i, take))
    extra = sorted(set(hf_sd) - used)
    if extra:
        raise ValueError(f"the {arch} weights hold tensors the modern family has no place for: {extra[:5]}")
    return {k: v.contiguous() for k, v in out.items()}
