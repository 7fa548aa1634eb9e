"""Sampling (model.sampling) and the generation engines that use it (eval.generate, train.sample):
sampling semantics, determinism, stop tokens, KV cache == no cache."""

import math

import pytest
import torch

from eval.backends import TorchBackend, decode_layout
from eval.generate import TextStream, generate, generate_no_cache
from eval.stops import StopWriter
from model import GPT, ModelConfig
from model.sampling import filter_logits, sample_next
from train import sample as train_sample


def backend(family: str = "gpt2", seed: int = 0, **kw) -> TorchBackend:
    torch.manual_seed(seed)
    base = dict(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32, family=family)
    if family == "modern":
        base.update(n_kv_head=2, bias=False, tie_embeddings=False)
    return TorchBackend(GPT(ModelConfig(**{**base, **kw})).eval(), {"tokenizer": "bytes"})


def lively(be: TorchBackend, scale: float = 10.0) -> TorchBackend:
    """Scale every weight matrix up: a tiny random model at init repeats one token forever, and a test
    of where generation crops needs text that depends on its context."""
    with torch.no_grad():
        for p in be.model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return be


# A hand-built distribution over 5 tokens: p = [0.5, 0.25, 0.15, 0.07, 0.03].
P = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
LOGITS = P.log()


def test_temperature_sharpens_and_flattens():
    torch.testing.assert_close(filter_logits(LOGITS, 1.0), P)
    hot, cold = filter_logits(LOGITS, 2.0), filter_logits(LOGITS, 0.5)
    torch.testing.assert_close(hot, P.sqrt() / P.sqrt().sum())  # p^(1/T), renormalized
    torch.testing.assert_close(cold, P**2 / (P**2).sum())


def test_temperature_zero_is_greedy_whatever_top_k_and_top_p():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in ((None, None), (2, None), (None, 0.5), (1, 0.1)):
        assert sample_next(logits, 0, top_k, top_p, generator=g).tolist() == [1, 0]
    with pytest.raises(ValueError, match="greedy"):
        filter_logits(logits, 0)


def test_same_generator_seed_same_draws():
    logits = torch.randn(3, 40)
    draw = [sample_next(logits, 1.3, 20, 0.95, torch.Generator().manual_seed(s)) for s in (5, 5)]
    torch.testing.assert_close(draw[0], draw[1])
    others = {tuple(sample_next(logits, 1.3, 20, 0.95, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_training_log_samples_equal_eval_samples():
    """train.sample (the training log's sampler) and eval.generate draw with the same rule: the same
    model, prompt, seed and settings give the same tokens."""
    be = backend(seed=3)
    for temperature, top_k, top_p in ((1.0, None, None), (0.7, 5, None), (1.2, None, 0.8), (0, None, None)):
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
        ours = train_sample.generate(be.model, [1, 2, 3], 16, **kw)
        theirs = generate(be, [[1, 2, 3]], 16, **kw)[0]
        assert ours == theirs, (temperature, top_k, top_p)


def test_top_k_keeps_the_k_most_likely():
    probs = filter_logits(LOGITS, 1.0, top_k=2)
    torch.testing.assert_close(probs, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.6, 2), (0.75, 2), (0.8, 3), (0.95, 4), (1.0, 5)])
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    """Holtzman et al. 2019: the smallest prefix of the sorted distribution with mass >= top_p."""
    probs = filter_logits(LOGITS, 1.0, top_p=top_p)
    assert int((probs > 0).sum()) == kept
    torch.testing.assert_close(probs[0, :kept], P[0, :kept] / P[0, :kept].sum())


def test_top_p_works_on_unsorted_rows_of_a_batch():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0)])  # row 1 has its best token last
    probs = filter_logits(logits, 1.0, top_p=0.7)
    assert (probs[0] > 0).tolist() == [True, True, False, False, False]
    assert (probs[1] > 0).tolist() == [False, False, False, True, True]


def test_sampling_frequencies_follow_the_filtered_distribution():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(LOGITS.expand(2000, -1), 1.0, top_k=3, generator=g)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    expected = torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9
    assert (freq - expected).abs().max() < 0.04
    assert freq[3] == 0 and freq[4] == 0


def test_same_seed_same_tokens_other_seed_other_tokens():
    be = backend()
    runs = [generate(be, [[1, 2, 3]], 20, temperature=1.0, seed=s) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_kv_cache_generation_equals_no_cache_generation(family):
    be = backend(family)
    prompt = [5, 17, 3, 88, 42]
    cached = generate(be, [prompt], 30, temperature=0)[0]
    plain = generate_no_cache(be.forward, prompt, 30, be.block_size)
    assert cached == plain
    assert len(set(cached)) > 1  # not a degenerate constant sequence


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_batched_prompts_of_different_lengths_match_one_by_one(family):
    be = backend(family, seed=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [30, 31, 32]]
    batched = generate(be, prompts, 12, temperature=0)
    alone = [generate(be, [p], 12, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_stop_token_ends_a_row_and_is_not_returned():
    be = backend()
    free = generate(be, [[1, 2, 3]], 15, temperature=0)[0]
    stop = free[4]
    first = free.index(stop)
    out = generate(be, [[1, 2, 3]], 15, temperature=0, stop_ids=[stop])[0]
    assert out == free[:first]


def test_on_token_can_finish_a_row():
    be = backend()
    seen = []
    out = generate(be, [[1, 2]], 10, temperature=0, on_token=lambda b, t: seen.append(t) or len(seen) == 3)
    assert len(out[0]) == 3 and seen == out[0]


def test_a_prompt_longer_than_the_context_is_a_clear_error():
    be = backend()
    with pytest.raises(ValueError, match="exceeds the model's context of 48"):
        generate(be, [[1] * 49], 10)


@pytest.mark.parametrize("family", ["gpt2", "modern"])
@pytest.mark.parametrize("prompt_len,keep", [(5, None), (48, 10)])
def test_generation_past_the_context_equals_the_cropping_reference(family, prompt_len, keep):
    """Past the 48-token context the engine re-prefills the last `keep` tokens (positions restart): the
    no-cache loop that crops the same way gives the same tokens; nanoGPT's sliding crop does not."""
    be = lively(backend(family))
    prompt = torch.randint(0, 97, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    n = 110  # two or more crops
    cached = generate(be, [prompt], n, temperature=0, keep=keep)[0]
    kept = keep or be.block_size // 2
    assert len(cached) == n
    assert cached == generate_no_cache(be.forward, prompt, n, be.block_size, keep=kept)
    assert cached != generate_no_cache(be.forward, prompt, n, be.block_size)  # the crop rule matters


def test_a_left_padded_batch_goes_past_the_context():
    """The longest row of a batch crops exactly when it would alone; shorter rows keep their padding."""
    be = lively(backend("modern"))
    prompts = [list(range(1, 21)), [7, 8, 9]]
    out = generate(be, prompts, 70, temperature=0)
    assert [len(o) for o in out] == [70, 70]
    assert out[0] == generate_no_cache(be.forward, prompts[0], 70, be.block_size, keep=24)


def test_text_stream_holds_back_partial_utf8():
    from data.tokenizer import get_tokenizer

    enc = get_tokenizer("bytes")
    stream = TextStream(enc)
    pieces = [stream.push(t) for t in "né€".encode()]
    assert pieces == ["n", "", "é", "", "", "€"]


def test_stop_writer_catches_a_stop_string_split_across_pieces():
    out = []
    w = StopWriter(["STOP"], out.append)
    stopped = [w.feed(p) for p in ["ab", "cS", "TO", "Pxyz"]]
    assert stopped == [False, False, False, True]
    assert "".join(out) == "abc"


def test_filter_logits_probabilities_sum_to_one():
    probs = filter_logits(torch.randn(4, 50), 0.7, top_k=10, top_p=0.9)
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    assert all(math.isfinite(v) for v in probs.flatten().tolist())


def test_compiled_decode_step_equals_eager():
    """--compile: the decode step compiled (dynamic shapes), left padding and a batch of two included."""
    eager = backend(n_layer=1)
    compiled = TorchBackend(eager.model, {}, compile=True)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert generate(compiled, prompts, 8, temperature=0) == generate(eager, prompts, 8, temperature=0)
    # The compiled step writes its keys into the backend's own cache tensors (in place), slot by slot.
    T = 5 + 7  # the left-padded prompt, then 7 decoded tokens (the 8th is sampled, never fed back)
    for ours, ref in zip(compiled.cache.k + compiled.cache.v, eager.cache.k + eager.cache.v, strict=True):
        torch.testing.assert_close(ours[:, :, :T], ref[:, :, :T], atol=1e-5, rtol=1e-5)
        assert ours[:, :, T:].abs().sum() == 0  # nothing written past the last decoded position


def test_decode_layout_keeps_values_shapes_and_tying():
    """decode_layout re-strides wide fp32 Linear weights; the model computes the same function."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64)).eval()
    x = torch.randint(0, 300, (2, 9))
    ref = model(x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    decode_layout(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # still one tied Parameter
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            wide = mod.out_features >= mod.in_features  # c_attn, attn c_proj, c_fc, the head; not mlp c_proj
            assert mod.weight.is_contiguous() != wide, name
            assert mod.weight.t().is_contiguous() == wide, name
    for n, p in model.named_parameters():
        assert p.shape == before[n].shape and torch.equal(p, before[n]), n
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    # The embedding still looks up rows of the re-strided table.
    torch.testing.assert_close(model.transformer.wte(x), before["transformer.wte.weight"][x])


def test_train_sample_cli(tmp_path, capsys):
    """python -m train.sample: the trainer's fallback sampler prints prompt + continuation; a missing
    checkpoint is one line and exit 2."""
    from _eval_fixtures import tiny_random

    art = tiny_random(tmp_path / "m")
    assert (
        train_sample.main(["--ckpt", str(art), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > len("def \n")
    assert train_sample.main(["--ckpt", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot sample from") and len(err.strip().splitlines()) == 1


def cached_and_full(be: TorchBackend) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of two left-padded rows through the backend's cache (prefill, then ten one-token
    steps) -> (logits (11, B, V) of the steps, the same positions from each row's no-cache forward alone)."""
    tokens, pad = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 8]]), torch.tensor([2, 0])
    logits = [be.prefill(tokens, pad, 20)]
    for _ in range(10):
        nxt = logits[-1].argmax(-1, keepdim=True)  # (B, 1)
        tokens = torch.cat([tokens, nxt], dim=1)
        logits.append(be.decode(nxt))
    ref = [be.forward(tokens[b : b + 1, p:])[0, -11:] for b, p in enumerate(pad.tolist())]  # (11, V) each
    return torch.stack(logits), torch.stack(ref, dim=1)


@pytest.mark.parametrize("family", ["gpt2", "modern"])
@pytest.mark.parametrize("kind", ["fp32", "int8", "int8-float"])
def test_backend_decoding_equals_the_full_forward(family, kind):
    """The backends' cached decoding (one GPT forward, the cache's positions and masks) gives each
    left-padded row the logits of the row alone without a cache. int8: kernels as tuned here;
    int8-float: every layer on its dequantized fp32 weight."""
    from model.quantize import quantize_model

    be = lively(backend(family, seed=3), 3.0)
    if kind != "fp32":  # quantized from fresh float weights (the fp32 backend re-lays its own)
        torch.manual_seed(3)
        q = quantize_model(GPT(be.model.config).eval(), kernel="float" if kind == "int8-float" else "auto")
        be = lively(TorchBackend(q, {}, name="int8"), 3.0)
    cached, full = cached_and_full(be)
    assert len(set(full.argmax(-1).flatten().tolist())) > 2  # the tokens fed back vary
    # fbgemm quantizes activations per call: a row alone and in a batch round a little differently
    tol = 1e-4 if kind != "int8" else 5e-2
    torch.testing.assert_close(cached, full, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "family,switches",
    [
        ("modern", dict(qk_norm=True, mlp="relu2", logit_softcap=3.0, doc_mask=True, eot_id=0)),
        ("gpt2", dict(mlp="relu2", qk_norm=True, zero_init_proj=True)),
    ],
)
def test_cached_decoding_runs_the_recipe_switches(family, switches):
    """The model's recipe switches (docs/model.md) run in cached decoding, which gives the no-cache
    forward's logits (with doc_mask: token 0 is <|endoftext|>, so row 0 opens a document after its
    first tokens)."""
    be = lively(backend(family, seed=5, **switches), 3.0)
    with torch.no_grad():  # zero_init_proj: give the projections weights, so the blocks count
        for p in be.model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.5)
    be = TorchBackend(be.model, {})
    cached, full = cached_and_full(be)
    assert len(set(full.argmax(-1).flatten().tolist())) > 2  # the tokens fed back vary
    if "logit_softcap" in switches:
        assert full.abs().max() <= switches["logit_softcap"]
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_every_model_config_field_is_declared_by_the_decode_paths():
    """Cached decoding (generation, the server, the compiled step, the ONNX decoder graph: one cached
    forward) lists the ModelConfig fields it handles: a field added to the model fails here until
    model/generation.py says how decoding treats it, so a new switch cannot be ignored unnoticed."""
    import dataclasses

    from model.config import ModelConfig
    from model.generation import HANDLED_FIELDS

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields - HANDLED_FIELDS == set(), "model/generation.py: say how cached decoding handles these"
    assert HANDLED_FIELDS - fields == set()  # no stale names


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_window_decoder_draws_the_cached_decoders_tokens(family):
    """model.generation.WindowDecoder (what sampling under tensor parallel uses: no cache, every step the
    whole window right-padded to a multiple) draws the KV-cache decoder's tokens, at every padding
    multiple, sampled and greedy, within the context and (multiples that divide it) past it. With
    doc_mask, an <|endoftext|> in the prompt restarts the attention, padding included."""
    from model.generation import CachedDecoder, WindowDecoder
    from model.generation import generate as loop

    be = lively(backend(family, seed=1, doc_mask=True, eot_id=96), 3.0)
    model, cfg = be.model, be.model.config
    prompt = [5, 9, 96, 3, 4, 7, 1]  # an EOT inside: the last document starts at slot 2
    for multiple in (1, 2, 3, 4):
        window = WindowDecoder(model, cfg.block_size, multiple=multiple)
        assert window.block_size == cfg.block_size - cfg.block_size % multiple
        for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=4)):
            want = loop(CachedDecoder(model), [prompt], 30, **kw)
            assert loop(window, [prompt], 30, **kw) == want, (multiple, kw)
        if cfg.block_size % multiple == 0:  # 70 tokens: the window crops twice, as the cache does
            want = loop(CachedDecoder(model), [prompt], 70, temperature=1.0, seed=2)
            assert loop(window, [prompt], 70, temperature=1.0, seed=2) == want, multiple
    assert len(set(want[0])) > 5  # a lively model: the tokens depend on the context
    with pytest.raises(ValueError, match="left padding"):
        loop(WindowDecoder(model, cfg.block_size, multiple=2), [[1, 2, 3], [4]], 3)
