"""Weight-only int8: sizes, accuracy on a trained model, the artifact round trip, every kernel."""

import copy
import platform

import pytest
import torch
from _eval_fixtures import shared_trained, tiny_random
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, ModelConfig
from model.io import load_model
from model.loss import mean_loss
from model.quantize import (
    PREFILL_ROWS,
    Int8Embedding,
    Int8Linear,
    linear_weight_bytes,
    load_quantized,
    pick_kernel,
    quantize_model,
    quantize_weight,
    save_quantized,
    tune_kernels,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return shared_trained(tmp_path_factory)


def val(data, n=16):
    from data.loader import val_batches

    return list(val_batches(data, seq_len=64, batch_size=8, max_batches=n))


def test_quantize_weight_is_symmetric_per_output_channel():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-4.0, 2.0, 1.0]])
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (3,)
    assert q[0].tolist() == [127, -64, 32] and q[2, 0].item() == -127  # max |w| of a row -> +-127
    assert q[1].abs().sum() == 0  # an all-zero row stays zero (and its scale is not 0)
    torch.testing.assert_close(q.float() * s[:, None], w, atol=4.0 / 254, rtol=0)


@pytest.mark.parametrize("kernel", ["dequant", "int8pack", "fbgemm"])
def test_every_kernel_matches_the_dequantized_reference(kernel):
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no FBGEMM")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    ref = Int8Linear.from_linear(lin, "dequant")
    got = Int8Linear.from_linear(lin, kernel)
    x = torch.randn(3, 5, 64)
    y_ref = ref(x)
    # fbgemm also quantizes the activations (7-bit, per tensor): close, not equal.
    tol = 0.05 * y_ref.abs().max().item() if kernel == "fbgemm" else 1e-4
    torch.testing.assert_close(got(x), y_ref, atol=tol, rtol=0)
    torch.testing.assert_close(ref(x), lin(x), atol=0.02, rtol=0)  # int8 weights vs float


def test_sizes_and_loss_on_a_trained_model(trained, tmp_path):
    art, data = trained
    model, meta = load_model(art)
    q = quantize_model(copy.deepcopy(model))
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.transformer.wte, Int8Embedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert linear_weight_bytes(model) / linear_weight_bytes(q) >= 3.5
    batches = val(data)
    loss_f, loss_q = mean_loss(model, batches), mean_loss(q, batches)
    assert loss_f < 3.0, "the fixture model should have learned something"
    assert abs(loss_q - loss_f) / loss_f < 0.01, (loss_f, loss_q)
    # the artifact: int8 on disk and says so in its metadata. The whole file shrinks a little less than
    # the Linears (the position table, norms and biases stay float: 12% of this tiny model).
    out = save_quantized(tmp_path / "int8", q, meta)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(art) / size(out) >= 3.0
    loaded, lmeta = load_quantized(out)
    assert lmeta["quantization"] == "int8" and lmeta["tokenizer"] == "bytes"
    assert loaded.lm_head.weight.dtype == torch.int8
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # stored once
    x = batches[0][0]
    torch.testing.assert_close(loaded(x), q(x), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "modern"])
def test_artifact_round_trip_untied_and_tied(tmp_path, family):
    art = tiny_random(tmp_path / "f", family=family)
    model, meta = load_model(art)
    q = quantize_model(copy.deepcopy(model), kernel="dequant")
    loaded, _ = load_quantized(save_quantized(tmp_path / "q", q, meta))
    for m in loaded.modules():
        if isinstance(m, Int8Linear):
            m.kernel = m.prefill_kernel = "dequant"
    x = torch.randint(0, 257, (2, 10))
    torch.testing.assert_close(loaded(x), q(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded(x), model(x), atol=0.05, rtol=0)


def test_head_left_float_when_asked(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    q = quantize_model(GPT(cfg), head=False)
    assert isinstance(q.lm_head, torch.nn.Linear) and isinstance(q.transformer.wte, torch.nn.Embedding)
    loaded, meta = load_quantized(save_quantized(tmp_path / "q", q, {}))
    assert meta["quantized_head"] is False
    x = torch.randint(0, 50, (1, 8))
    torch.testing.assert_close(loaded(x), q(x), atol=0, rtol=0)


class OpNames(TorchDispatchMode):
    """The ATen / quantized ops that run inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# the matmul each kernel stands for; the others must not run
KERNEL_OP = {
    "int8pack": "aten._weight_int8pack_mm.default",
    "fbgemm": "quantized.linear_dynamic.default",
    "dequant": "aten.addmm.default",
    "float": "aten.addmm.default",
}
DEQUANTIZE_OP = "aten._to_copy.default"  # int8 -> float: the reference dequantizes per call, "float" never


def ran_kernels(q: Int8Linear, x: torch.Tensor) -> set[str]:
    q(x)  # "float" builds its fp32 weight on the first call (a dequantization): watch the second
    with OpNames() as mode:
        q(x)
    return {k for k, op in KERNEL_OP.items() if op in mode.ops} - (
        {"float"} if DEQUANTIZE_OP in mode.ops else {"dequant"}
    )


@pytest.mark.parametrize("kernel", ["auto", "int8pack", "fbgemm", "dequant", "float"])
def test_each_kernel_runs_its_own_matmul(kernel):
    """A kernel that silently fell back to the dequantized reference would still match it in value:
    check the op that runs. "auto" must run the kernel pick_kernel chose for this machine."""
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no FBGEMM")
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(64, 48), kernel)
    resolved = pick_kernel("cpu") if kernel == "auto" else kernel
    assert q.kernel == q.prefill_kernel == resolved
    assert ran_kernels(q, torch.randn(3, 64)) == {resolved}


def test_kernel_choice_follows_the_machine():
    """The static rule: FBGEMM on x86 (vectorized on AVX2 and AVX-512, where int8pack lost to fp32),
    int8pack on ARM (no FBGEMM there), the reference where neither applies."""
    arm = platform.machine().lower() in ("arm64", "aarch64")
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    choice = pick_kernel("cpu")
    assert choice == ("int8pack" if arm else "fbgemm" if fbgemm else "dequant")
    assert pick_kernel("meta") == "dequant"  # not a CPU: the reference path (GPUs take it too)
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        Int8Linear(4, 4, kernel="fast")


def test_tuned_kernels_follow_the_timings():
    """tune_kernels takes the fastest candidate per layer shape, for decode (1 row) and prefill
    (many rows) separately, and leaves layers with an explicit kernel alone; forward then runs the
    decode kernel on a few rows and the prefill kernel from PREFILL_ROWS rows on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Int8Linear.from_linear(torch.nn.Linear(64, 48)),
        Int8Linear.from_linear(torch.nn.Linear(48, 64)),
        Int8Linear.from_linear(torch.nn.Linear(64, 48), kernel="dequant"),  # the caller's choice
    )
    # a made-up machine: float wins decode of the 64 -> 48 layer, int8pack of the other; dequant prefill
    speed = {(64, "float", 1): 1, (48, "int8pack", 1): 1, (64, "dequant", 64): 1, (48, "dequant", 64): 1}
    calls = []

    def timer(q, kernel, rows):
        calls.append((q.in_features, kernel, rows))
        return speed.get((q.in_features, kernel, rows), 5)

    chosen = tune_kernels(model, timer=timer)
    assert chosen == {(64, 48, True, "cpu"): ("float", "dequant"), (48, 64, True, "cpu"): ("int8pack", "dequant")}
    assert [(m.kernel, m.prefill_kernel) for m in model] == [("float", "dequant"), ("int8pack", "dequant")] + [
        ("dequant", "dequant")
    ]
    assert not any(k == "int8pack" and rows > 1 for _, k, rows in calls)  # never a prefill candidate
    q = model[0]
    assert ran_kernels(q, torch.randn(2, 64)) == {"float"}
    assert ran_kernels(q, torch.randn(1, PREFILL_ROWS, 64)) == {"dequant"}
    assert ran_kernels(model[1], torch.randn(1, 48)) == {"int8pack"}


def test_tuning_on_this_machine_keeps_the_values():
    """The real timer: whatever it picks computes what the reference does."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q, ref = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, "dequant")
    tune_kernels(torch.nn.Sequential(q))
    for x in (torch.randn(1, 64), torch.randn(40, 64)):
        tol = 0.05 * ref(x).abs().max().item()  # fbgemm quantizes activations too
        torch.testing.assert_close(q(x), ref(x), atol=tol, rtol=0)


def test_float_loader_refuses_an_int8_artifact(tmp_path):
    """model.io loads float artifacts only; the int8 loader is chosen where backends are (eval/)."""
    from model.io import ArtifactError

    art = tiny_random(tmp_path / "f")
    model, meta = load_model(art)
    out = save_quantized(tmp_path / "q", quantize_model(model), meta)
    with pytest.raises(ArtifactError, match="int8 artifact; load it through eval"):
        load_model(out)


def test_quantizing_a_re_strided_model_gives_the_same_int8_model():
    """eval/backends.decode_layout re-strides fp32 weights in place (same values); quantizing such a model
    must give the same int8 weights, row-major, which the int8pack kernel requires."""
    from eval.backends import decode_layout

    model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64)).eval()
    plain = quantize_model(copy.deepcopy(model), kernel="int8pack")
    decode_layout(model)
    strided = quantize_model(model, kernel="int8pack")
    x = torch.randint(0, 300, (2, 9))
    for (name, a), (_, b) in zip(plain.state_dict().items(), strided.state_dict().items(), strict=True):
        assert torch.equal(a, b) and b.is_contiguous(), name
    torch.testing.assert_close(strided(x), plain(x))
