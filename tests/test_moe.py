"""The mixture-of-experts block (model/moe.py): routing, the grouped and looped expert compute against a
naive per-token reference (forward and gradients), the aux losses in the training loss, the
aux-loss-free bias update, parameter and FLOP counts. Tiny models on the CPU."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, ModelConfig
from model.moe import MoE, after_step, moe_layers, routing_health

BASE = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, family="modern", bias=False)
MOE = dict(n_experts=4, moe_top_k=2, moe_hidden=24)


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**BASE, **MOE, **kw}))


def naive_moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The block's function token by token, from its definition (Mixtral; DeepSeek-V3 eq. 12-16):
    softmax or sigmoid scores, the top-k by score + bias, weights the unbiased scores of the chosen
    (renormalised when norm_topk), each chosen expert's SwiGLU weighted and summed, plus shared experts."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = m.router.weight.float() @ x[n].float()  # (E,)
        scores = torch.sigmoid(logits) if m.sigmoid else torch.softmax(logits, -1)
        chosen = sorted(range(m.n_experts), key=lambda e: -(scores[e] + m.expert_bias[e]).item())[: m.top_k]
        w = scores[chosen]
        if m.norm_topk:
            w = w / w.sum()
        for weight, e in zip(w * m.scale, chosen, strict=True):
            H = m.w_down.shape[2]
            h = m.w_up[e] @ x[n]  # (2H,)
            out[n] = out[n] + weight * (m.w_down[e] @ (F.silu(h[:H]) * h[H:]))
        if m.shared is not None:
            out[n] = out[n] + m.shared(x[n][None])[0]
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(moe_router="sigmoid", moe_route_scale=2.5, n_shared_experts=1),
        dict(moe_norm_topk=False, moe_top_k=1),
    ],
)
@pytest.mark.parametrize("grouped", [False, True])
def test_expert_compute_equals_a_per_token_reference_forward_and_gradients(kw, grouped):
    if grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped matmul")
    model = tiny(**kw, moe_grouped_mm=grouped)
    m = model.transformer.h[0].mlp
    with torch.no_grad():
        m.router.weight.normal_(std=0.3)  # scores that differ between tokens
        m.expert_bias.copy_(torch.tensor([0.03, -0.02, 0.0, 0.01]))  # the bias changes the choice only
        m.w_down.normal_(std=0.1)
    x = torch.randn(3, 5, 32)
    x.requires_grad_(True)
    _, _, chosen = m.route(m.router(x.detach().view(-1, 32)).float())
    counts = torch.bincount(chosen.flatten(), minlength=4)
    assert (counts > 0).all() and len(set(counts.tolist())) > 2  # uneven groups, none empty
    got = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = naive_moe(m, x_ref.view(-1, 32)).view(3, 5, 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    params = [m.router.weight, m.w_up, m.w_down]
    grads = torch.autograd.grad(got, [x, *params], g)
    grads_ref = torch.autograd.grad(ref, [x_ref, *params], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_every_kth_block_is_moe_after_the_first_dense_ones():
    cfg = ModelConfig(**{**BASE, **MOE, "n_layer": 6, "moe_every": 2, "moe_first_dense": 2})
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, False, True, False, True]
    model = GPT(cfg)
    assert [type(b.mlp).__name__ for b in model.transformer.h] == ["MLP", "MLP", "MLP", "MoE", "MLP", "MoE"]
    assert not ModelConfig(**BASE).is_moe_layer(0)  # off by default


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(moe_top_k=5), "model.moe_top_k must be in [1, n_experts=4]"),
        (dict(mlp="gelu"), "MoE experts are SwiGLU FFNs; set model.mlp: swiglu"),
        (dict(moe_router="noisy"), "model.moe_router must be one of softmax, sigmoid"),
        (dict(moe_every=3), "no block is MoE with moe_every=3"),
    ],
)
def test_bad_moe_settings_are_one_line(kw, msg):
    with pytest.raises(ValueError, match="^" + msg.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig(**{**BASE, **MOE, **kw})


def test_total_and_active_parameters_and_flops():
    model = tiny(n_shared_experts=1)
    E, k, C, H = 4, 2, 32, 24
    experts = 2 * E * 3 * C * H  # 2 MoE blocks, E experts of 3 C x H matrices
    total = model.num_params()
    assert total == sum(p.numel() for p in model.parameters())
    assert total - model.num_params(active=True) == experts * (E - k) // E
    dense_flops = GPT(ModelConfig(**BASE)).flops_per_token(16)
    attn = 12 * 2 * 4 * 8 * 16
    assert model.flops_per_token(16) == 6 * model.num_params(non_embedding=True, active=True) + attn
    assert model.flops_per_token(16) != dense_flops


def test_training_loss_value_is_the_cross_entropy_and_its_gradient_has_the_aux_losses():
    model = tiny(moe_aux_loss_coef=0.5, moe_z_loss_coef=0.1).train()
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    loss = model(x, y)
    logits = model(x)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert loss.item() == pytest.approx(ce.item(), abs=1e-6)  # the logged value: no aux term
    router = model.transformer.h[0].mlp.router.weight
    (g_loss,) = torch.autograd.grad(model(x, y), router)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(model(x).flatten(0, 1), y.flatten()), router)
    # the same forward's aux losses, recomputed from the block's definition
    model(x, y)
    aux = sum(0.5 * m.balance_loss + 0.1 * m.z_loss for m in moe_layers(model))
    assert aux > 0 and not torch.allclose(g_loss, g_ce)
    model.eval()
    assert model(x, y).item() == pytest.approx(ce.item(), abs=1e-6)


def test_aux_losses_follow_switch_and_st_moe():
    model = tiny().train()
    m = model.transformer.h[0].mlp
    x = torch.randn(64, 32)
    m(x[None])
    logits = x @ m.router.weight.T  # (N, E)
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1).indices
    f = torch.stack([(top == e).sum() for e in range(4)]).float() / (64 * 2)
    assert m.balance_loss.item() == pytest.approx(4 * (f * probs.mean(0)).sum().item(), rel=1e-5)
    assert m.z_loss.item() == pytest.approx((torch.logsumexp(logits, -1) ** 2).mean().item(), rel=1e-5)


def skewed_layer(rate: float) -> MoE:
    """One MoE block whose router sends almost every token to expert 0 (a large bias column)."""
    model = tiny(moe_bias_update_rate=rate, moe_router="sigmoid", n_layer=1).train()
    m = model.transformer.h[0].mlp
    with torch.no_grad():
        m.router.weight.normal_(std=0.1)
        m.router.weight[0] += 0.5  # expert 0's score grows with sum(x), its logit up ~2 for most tokens
    return model


def shares_after(model: GPT, steps: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(1, 64, 32, generator=gen) + 0.5
        with torch.no_grad():
            model.transformer.h[0].mlp(x)
        after_step(model)
    m = model.transformer.h[0].mlp
    return m.last_load / m.last_load.sum()


def test_the_aux_loss_free_bias_evens_out_a_skewed_router():
    first = shares_after(skewed_layer(0.01), 1)
    assert first.max() > 0.45  # expert 0 in almost every token's top 2: 1/4 each when balanced
    balanced = skewed_layer(0.01)
    shares = torch.stack([shares_after(balanced, 1, seed) for seed in range(300)])[-50:].mean(0)
    assert shares.max() < 0.3 and shares.min() > 0.2, shares
    bias = balanced.transformer.h[0].mlp.expert_bias
    assert bias[0] == bias.min() and balanced.state_dict()["transformer.h.0.mlp.expert_bias"] is not None
    health = routing_health(balanced)
    assert set(health) == {f"moe/0/{k}" for k in ("max_share", "min_share", "balance_loss", "z_loss", "bias_range")}
    assert math.isclose(health["moe/0/bias_range"], (bias.max() - bias.min()).item(), rel_tol=1e-6)
    # the control: without the update the skew stays
    frozen = skewed_layer(0.0)
    shares = torch.stack([shares_after(frozen, 1, seed) for seed in range(50)]).mean(0)
    assert shares.max() > 0.45


def test_dense_models_have_no_routing_health_and_after_step_is_a_no_op():
    model = GPT(ModelConfig(**BASE))
    after_step(model)
    assert routing_health(model) == {}


def test_muon_steps_each_expert_matrix_as_torch_optim_muon_does_a_2d_weight():
    """A 3-D expert weight (E, out, in) is E matrices to Muon: each expert's update equals
    torch.optim.Muon's on that expert's matrix alone (bfloat16 Newton-Schulz, several steps)."""
    from train.config import OptimSection
    from train.optim import MUON_GROUP, MuonAdamW, build_optimizer

    opt = build_optimizer(tiny(), OptimSection(name="muon"))
    muon = next(g for g in opt.param_groups if g["name"] == MUON_GROUP)["params"]
    assert sum(p.dim() == 3 for p in muon) == 4  # w_up and w_down of both MoE blocks
    torch.manual_seed(0)
    expert = torch.nn.Parameter(torch.randn(3, 48, 16))
    ref = [torch.nn.Parameter(m.detach().clone()) for m in expert]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    bias = [{"params": [torch.nn.Parameter(torch.zeros(4))], "name": "no_decay"}]
    opt = MuonAdamW(bias, [{"params": [expert], "name": MUON_GROUP}], {"lr": 1e-3}, kw, ns_dtype="bfloat16")
    torch_opt = torch.optim.Muon(ref, **kw)
    for _ in range(3):
        expert.grad = torch.randn_like(expert)
        for e, r in enumerate(ref):
            r.grad = expert.grad[e].clone()
        opt.step()
        torch_opt.step()
    for e, r in enumerate(ref):
        assert torch.equal(expert[e], r)
