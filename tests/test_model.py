"""The GPT itself: shapes, causality, KV cache, presets, padding, training, artifacts."""

import dataclasses

import pytest
import torch

from model import GPT, KVCache, ModelConfig
from model.io import ArtifactError, load_model, resolve, save_artifact
from model.loss import mean_loss


def tiny(family: str, **kw) -> ModelConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, family=family)
    if family == "modern":
        base.update(n_kv_head=2, bias=False, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


FAMILIES = ["gpt2", "modern"]


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
    torch.manual_seed(0)
    model = GPT(tiny(family)).eval()
    idx = torch.randint(0, 97, (2, 16))
    base = model(idx)
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 97
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} saw token {t + 1}"
        assert not torch.allclose(out[:, t + 1], base[:, t + 1]), "the changed token had no effect"


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_full_forward(family):
    torch.manual_seed(0)
    cfg = tiny(family, pad_vocab_multiple=64)
    model = GPT(cfg).eval()
    idx = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = KVCache(cfg, batch_size=3)
        steps = [model(idx[:, :10], kv_cache=cache, start_pos=0)]  # prefill
        steps += [model(idx[:, 10:13], kv_cache=cache, start_pos=10)]  # a few tokens at once
        steps += [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(13, 24)]
    assert full.shape == (3, 24, 97)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_left_padding(family):
    """Rows of a batch with different prompt lengths, left-padded, decode like each row alone."""
    torch.manual_seed(0)
    cfg = tiny(family)
    model = GPT(cfg).eval()
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 7))
    pad = 12 - 7
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])  # (2, 12)
    with torch.no_grad():
        cache = KVCache(cfg, batch_size=2, left_pad=torch.tensor([0, pad]))
        logits = model(batch, kv_cache=cache, start_pos=0)[:, -1]  # (2, V)
        nxt = torch.tensor([[5], [9]])
        step = model(nxt, kv_cache=cache, start_pos=12)[:, -1]
        ref_a = model(torch.cat([a, nxt[:1]], 1))[:, -2:]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[:, -2:]
    torch.testing.assert_close(logits[0], ref_a[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], ref_b[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0], ref_a[0, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1], ref_b[0, 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "preset,count",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):  # gpt2-xl in fp32 is 6 GB
        model = GPT(ModelConfig.from_preset(preset))
    assert model.num_params() == count
    # non-embedding drops only the position table (the tied token table is the output matmul)
    assert model.num_params(non_embedding=True) == count - 1024 * model.config.n_embd


def test_padded_vocabulary_is_never_exposed():
    torch.manual_seed(0)
    cfg = tiny("gpt2", vocab_size=100, pad_vocab_multiple=64)
    assert cfg.padded_vocab_size == 128 and cfg.vocab_size == 100
    assert ModelConfig.from_preset("gpt2", pad_vocab_multiple=64).padded_vocab_size == 50304
    model = GPT(cfg)
    assert model.lm_head.weight.shape[0] == 128
    with torch.no_grad():  # make the padded rows win the argmax if they leaked
        model.lm_head.weight[100:] = 10.0
    idx = torch.randint(0, 100, (2, 8))
    logits = model(idx)
    assert logits.shape == (2, 8, 100)
    loss = model(idx, idx)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    torch.testing.assert_close(loss, ref)


def test_ignore_index_and_loss_value():
    torch.manual_seed(0)
    model = GPT(tiny("gpt2"))
    idx = torch.randint(0, 97, (2, 8))
    y = idx.clone()
    y[:, :4] = -100
    logits = model(idx)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), idx[:, 4:].flatten())
    torch.testing.assert_close(model(idx, y), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_trains_fp32_and_bf16(family):
    torch.manual_seed(0)
    model = GPT(tiny(family))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for step in range(30):
        dtype = torch.bfloat16 if step % 2 else torch.float32  # both paths must train
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


FLOP_VARIANTS = {  # both families and the recipe switches that change the matmul widths
    "gpt2": ("gpt2", {}),
    "modern-gqa": ("modern", {}),
    "gpt2-relu2": ("gpt2", dict(mlp="relu2")),
    "modern-swiglu-wide": ("modern", dict(ffn_hidden=96, n_kv_head=1)),
    "gpt2-swiglu-padded": ("gpt2", dict(mlp="swiglu", pad_vocab_multiple=64, tie_embeddings=False)),
    "modern-qknorm-softcap": ("modern", dict(qk_norm=True, logit_softcap=15.0, mlp="relu2")),
}


@pytest.mark.parametrize("variant", FLOP_VARIANTS)
def test_flops_per_token_against_an_independent_count(variant):
    """flops_per_token (PaLM's 6N + 12·L·H·D·T) against torch's FlopCounterMode over a real forward +
    backward. The counter counts matmuls only: 6 FLOPs per token per Linear weight (forward, grad of
    the input, grad of the weight) and the attention's two T x T products (QK^T, AV: forward plus
    twice in backward, the full square as the formula has it; the math SDPA backend makes them
    visible bmm's, and under GQA it expands K/V to every query head, which the formula's H assumes).
    6N also counts the biases and norm gains as if they were matmul weights: that remainder, and
    nothing else, separates the two."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    family, kw = FLOP_VARIANTS[variant]
    torch.manual_seed(0)
    model = GPT(tiny(family, **kw))
    B, T = 2, 32
    x, y = torch.randint(0, 97, (B, T)), torch.randint(0, 97, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    counted = counter.get_total_flops() / (B * T)
    matmul_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    embeddings = {id(model.transformer.wte.weight)} | (
        {id(model.transformer.wpe.weight)} if "wpe" in model.transformer else set()
    )
    not_in_matmuls = sum(
        p.numel() for p in model.parameters() if id(p) not in matmul_weights and id(p) not in embeddings
    )
    formula = model.flops_per_token(T)
    assert formula - counted == 6 * not_in_matmuls
    assert formula == pytest.approx(counted, rel=0.03)  # biases and gains: under 3% of this tiny model


def test_flops_per_token_counts_a_models_active_parameters():
    """A mixture of experts is charged 6 FLOPs per active parameter (the parameters one token passes
    through: its top-k routed experts, not all of them), not per stored one."""
    cfg = dataclasses.replace(tiny("modern"), mlp="swiglu", n_experts=4, moe_top_k=1)
    moe = GPT(cfg)
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 32
    stored, active = moe.num_params(non_embedding=True), moe.num_params(non_embedding=True, active=True)
    # each MoE block stores 4 experts and runs 1: 3 experts' weights per block are not active
    expert = sum(p.numel() for n, p in moe.named_parameters() if n.endswith(("w_up", "w_down")))
    assert expert > 0 and stored - active == expert * 3 // 4
    assert moe.flops_per_token(32) - attention == 6 * active


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, block_size=64))
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(n_head=12, n_kv_head=5, family="modern")
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="llama")
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("gpt5")


def test_context_overflow_raises():
    model = GPT(tiny("gpt2"))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_artifact_round_trip(tmp_path, family):
    torch.manual_seed(0)
    cfg = tiny(family, pad_vocab_multiple=8)
    model = GPT(cfg).eval()
    save_artifact(tmp_path / "art", model, cfg, {"tokenizer": "bytes", "step": 7})
    loaded, meta = load_model(tmp_path / "art")
    assert meta == {"tokenizer": "bytes", "step": 7}
    assert loaded.config == cfg
    idx = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(loaded(idx), model(idx), atol=0, rtol=0)
    if cfg.tie_embeddings:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with pytest.raises(FileExistsError):
        save_artifact(tmp_path / "art", model, cfg)


def test_resolve_run_directory_and_errors(tmp_path):
    cfg = tiny("gpt2")
    ck = tmp_path / "run" / "checkpoints" / "step_000010"
    save_artifact(ck / "model", GPT(cfg), cfg, {"step": 10})
    with pytest.raises(ArtifactError, match="no complete checkpoint"):
        resolve(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000010\n")
    assert resolve(tmp_path / "run") == ck / "model"
    assert resolve(ck) == ck / "model"
    with pytest.raises(ArtifactError, match="does not exist"):
        resolve(tmp_path / "nope")
    (ck / "model" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_model(tmp_path / "run")


def test_checkpoint_without_an_artifact_names_consolidate(tmp_path):
    """model/ reads artifacts only: a sharded checkpoint without model/ says how to write one."""
    ck = tmp_path / "run" / "checkpoints" / "step_000005"
    (ck / "state").mkdir(parents=True)
    (ck / "train_state.pt").write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000005\n")
    with pytest.raises(ArtifactError, match=f"python -m train.consolidate {ck}"):
        load_model(tmp_path / "run")


@pytest.mark.parametrize("family", FAMILIES)
def test_load_weights_is_strict_and_knows_the_tied_head(family):
    torch.manual_seed(0)
    cfg = tiny(family)
    src, dst = GPT(cfg), GPT(cfg)
    sd = src.state_dict()
    dst.load_weights(sd)  # with lm_head.weight (a full state dict)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in sd.items())
    if cfg.tie_embeddings:
        dst.load_weights({k: v for k, v in sd.items() if k != "lm_head.weight"})  # stored once
        assert dst.lm_head.weight is dst.transformer.wte.weight
        bad = {**sd, "lm_head.weight": sd["lm_head.weight"] + 1}
        with pytest.raises(ValueError, match="lm_head.weight differs"):
            dst.load_weights(bad)
    else:
        with pytest.raises(ValueError, match="missing lm_head.weight"):
            dst.load_weights({k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"missing transformer\.ln_f\.weight.*unexpected extra\.w"):
        dst.load_weights(
            {
                **{k: v for k, v in sd.items() if k != "transformer.ln_f.weight"},
                "extra.w": sd["transformer.ln_f.weight"],
            }
        )


def test_mean_loss_weights_by_scored_tokens():
    model = GPT(tiny("gpt2"))
    x = torch.randint(0, 97, (2, 8))
    y1, y2 = x.clone(), x.clone()
    y2[:, :6] = -100  # second batch scores 4 tokens, the first 16
    l1, l2 = model.eval()(x, y1).item(), model(x, y2).item()
    got = mean_loss(model, [(x, y1), (x, y2)])
    assert abs(got - (16 * l1 + 4 * l2) / 20) < 1e-5
    assert abs(mean_loss(model, [(x, y1), (x, y2)], max_batches=1) - l1) < 1e-6
    model.train()
    mean_loss(model, [(x, y1)])
    assert model.training, "mean_loss must restore training mode"
