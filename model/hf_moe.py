"""Hugging Face Mixtral / Qwen3-MoE <-> our modern family with mixture-of-experts blocks.

Both HF classes route as our softmax router does (transformers' MixtralTopKRouter, Qwen3MoeTopKRouter:
softmax over the router logits in float32, top-k, optionally renormalised) and run SwiGLU experts
(Jiang et al. 2024, Mixtral; Qwen3-MoE). A model without QK-norm maps onto Mixtral (every block MoE, top-k
weights renormalised); one with QK-norm onto Qwen3-MoE (RMSNorm on queries and keys per head, dense blocks
by decoder_sparse_step / mlp_only_layers, norm_topk_prob either way). What neither expresses -- shared
experts, the sigmoid router, a routed-output scale, a trained routing bias -- is refused by name.

Expert weights are written per expert (Mixtral's experts.{e}.w1 / w3 / w2 = gate / up / down, Qwen3-MoE's
experts.{e}.gate_proj / up_proj / down_proj), the layout of the published checkpoints, which every
transformers release loads (5.x fuses them on load: transformers/conversion_mapping.py); they are read in
that layout or in transformers 5's fused experts.gate_up_proj (E, 2I, H) / experts.down_proj (E, H, I).
Attention, norms and embeddings map as for Llama (model/hf.py). Plain tensors and dicts: no transformers import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from model.config import ModelConfig
from model.hf import (
    _llama_mlp_from_hf,
    _llama_mlp_to_hf,
    check_switches,
    llama_config_from_hf,
    llama_config_to_hf,
    llama_from_hf_state_dict,
    llama_to_hf_state_dict,
)

MOE_TYPES = ("mixtral", "qwen3_moe")


def _arch(cfg: ModelConfig) -> str:
    return "Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM"


def check_moe_export(cfg: ModelConfig) -> None:
    """Raise ValueError (one line, naming the switch) for what the target HF class cannot express."""
    arch = _arch(cfg)
    if cfg.family != "modern" or cfg.bias:
        raise ValueError(f"only the modern family without biases has a Hugging Face {arch} equivalent")
    check_switches(dataclasses.replace(cfg, qk_norm=False), f"Hugging Face {arch}", ("swiglu",))
    if cfg.n_shared_experts:
        raise ValueError(
            f"model.n_shared_experts={cfg.n_shared_experts} (always-on shared experts) has no {arch} equivalent"
        )
    if cfg.moe_router != "softmax":
        raise ValueError(f"model.moe_router={cfg.moe_router} has no {arch} equivalent (its router is softmax top-k)")
    if cfg.moe_route_scale != 1:
        raise ValueError(
            f"model.moe_route_scale={cfg.moe_route_scale} (a routed-output scale) has no {arch} equivalent"
        )
    if not cfg.qk_norm and (cfg.moe_every != 1 or cfg.moe_first_dense):
        raise ValueError(
            "dense blocks between MoE blocks (model.moe_every / moe_first_dense) have no MixtralForCausalLM "
            "equivalent; Qwen3MoeForCausalLM has them but needs model.qk_norm: true"
        )
    if not cfg.qk_norm and not cfg.moe_norm_topk:
        raise ValueError("model.moe_norm_topk=false has no MixtralForCausalLM equivalent (it renormalises the top-k)")


def moe_config_to_hf(cfg: ModelConfig, eos_token_id: int | None = None) -> dict:
    """MixtralConfig (no QK-norm) or Qwen3MoeConfig (QK-norm) kwargs for a modern-family MoE config."""
    check_moe_export(cfg)
    base = llama_config_to_hf(dataclasses.replace(cfg, qk_norm=False, n_experts=0), eos_token_id)  # attention
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    common = {k: base[k] for k in keep + ("hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta")}
    common.update(
        rope_parameters=base["rope_parameters"],
        attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        num_experts_per_tok=cfg.moe_top_k,
        output_router_logits=False,
        router_aux_loss_coef=cfg.moe_aux_loss_coef,
    )
    if not cfg.qk_norm:
        return dict(
            model_type="mixtral",
            architectures=["MixtralForCausalLM"],
            **common,
            intermediate_size=cfg.expert_hidden,
            num_local_experts=cfg.n_experts,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    return dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        **common,
        intermediate_size=cfg.hidden_dim,  # the dense blocks'
        moe_intermediate_size=cfg.expert_hidden,
        num_experts=cfg.n_experts,
        decoder_sparse_step=cfg.moe_every,
        mlp_only_layers=list(range(cfg.moe_first_dense)),
        norm_topk_prob=cfg.moe_norm_topk,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
    )


def moe_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a MixtralConfig or Qwen3MoeConfig dict; refuses what the MoE block lacks, one line each."""
    kind = hf.get("model_type")
    if kind not in MOE_TYPES:
        raise ValueError(f"expected model_type mixtral or qwen3_moe, got {kind!r}")
    qwen = kind == "qwen3_moe"
    if qwen and not hf.get("use_sliding_window"):
        hf = {**hf, "sliding_window": None}  # Qwen3-MoE keeps a window size it does not use
    cfg = llama_config_from_hf({**hf, "model_type": "llama"})  # attention, norms, RoPE, their refusals
    moe = dict(moe_top_k=hf["num_experts_per_tok"], qk_norm=qwen)
    if qwen:
        dense = sorted(hf.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            raise ValueError(f"mlp_only_layers {dense} are not the first blocks; moe_first_dense expresses only those")
        moe.update(
            n_experts=hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],  # 5.x writes the alias
            moe_hidden=hf["moe_intermediate_size"],
            moe_every=hf.get("decoder_sparse_step", 1),
            moe_first_dense=len(dense),
            moe_norm_topk=bool(hf.get("norm_topk_prob", False)),
        )
    else:
        moe.update(n_experts=hf["num_local_experts"], moe_hidden=hf["intermediate_size"])
    return dataclasses.replace(cfg, **moe)


def _expert_names(cfg: ModelConfig, prefix: str) -> tuple[str, str, str]:
    """Per-expert (gate, up, down) name templates under `prefix`, {e} the expert."""
    if cfg.qk_norm:
        return tuple(prefix + "experts.{e}." + p + "_proj.weight" for p in ("gate", "up", "down"))
    return tuple(prefix + "experts.{e}." + w + ".weight" for w in ("w1", "w3", "w2"))


def _moe_prefix(cfg: ModelConfig, i: int) -> str:
    return f"model.layers.{i}." + ("mlp." if cfg.qk_norm else "block_sparse_moe.")


def moe_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> MixtralForCausalLM's / Qwen3MoeForCausalLM's (per-expert names)."""
    check_moe_export(cfg)

    def mlp(i: int, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not cfg.is_moe_layer(i):
            return _llama_mlp_to_hf(i, sd)
        o, prefix = f"transformer.h.{i}.mlp.", _moe_prefix(cfg, i)
        if sd[o + "expert_bias"].any():
            raise ValueError(
                f"block {i} has a trained routing bias (model.moe_bias_update_rate), "
                f"which {_arch(cfg)} has no place for"
            )
        out = {prefix + "gate.weight": sd[o + "router.weight"]}
        gate_t, up_t, down_t = _expert_names(cfg, prefix)
        for e in range(cfg.n_experts):
            gate, up = sd[o + "w_up"][e].chunk(2)
            out.update({gate_t.format(e=e): gate, up_t.format(e=e): up, down_t.format(e=e): sd[o + "w_down"][e]})
        return out

    return llama_to_hf_state_dict(sd, cfg, mlp)


def moe_from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MixtralForCausalLM's / Qwen3MoeForCausalLM's state dict (per-expert or fused experts) -> ours."""

    def mlp(i: int, take: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        if not cfg.is_moe_layer(i):
            return _llama_mlp_from_hf(i, take)
        o, prefix = f"transformer.h.{i}.mlp.", f"model.layers.{i}.mlp."  # transformers 5's fused experts
        if prefix + "experts.gate_up_proj" in hf_sd:
            w_up, w_down = take(prefix + "experts.gate_up_proj"), take(prefix + "experts.down_proj")
        else:
            prefix = _moe_prefix(cfg, i)
            gate_t, up_t, down_t = _expert_names(cfg, prefix)
            experts = range(cfg.n_experts)
            w_up = torch.stack([torch.cat([take(gate_t.format(e=e)), take(up_t.format(e=e))]) for e in experts])
            w_down = torch.stack([take(down_t.format(e=e)) for e in experts])
        router = take(prefix + "gate.weight")
        return {
            o + "router.weight": router,
            o + "w_up": w_up,
            o + "w_down": w_down,
            o + "expert_bias": torch.zeros(cfg.n_experts),
        }

    return llama_from_hf_state_dict(hf_sd, cfg, _arch(cfg), mlp)
