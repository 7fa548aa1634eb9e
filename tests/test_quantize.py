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
    Int8Embedding,
    Int8Linear,
    linear_weight_bytes,
    load_quantized,
    pick_kernel,
    quantize_model,
    quantize_weight,
    save_quantized,
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
            m.kernel = "dequant"
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


# the matmul each kernel stands for; the other two must not run
KERNEL_OP = {
    "int8pack": "aten._weight_int8pack_mm.default",
    "fbgemm": "quantized.linear_dynamic.default",
    "dequant": "aten.addmm.default",
}


@pytest.mark.parametrize("kernel", ["auto", "int8pack", "fbgemm", "dequant"])
def test_each_kernel_runs_its_own_matmul(kernel):
    """A kernel that silently fell back to the dequantized reference would still match it in value:
    check the op that runs. "auto" must run the kernel pick_kernel chose for this machine."""
    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no FBGEMM")
    torch.manual_seed(0)
    q = Int8Linear.from_linear(torch.nn.Linear(64, 48), kernel)
    resolved = pick_kernel("cpu") if kernel == "auto" else kernel
    assert q.kernel == resolved
    x = torch.randn(3, 64)
    with OpNames() as mode:
        q(x)
    ran = {op for op in KERNEL_OP.values() if op in mode.ops}
    assert ran == {KERNEL_OP[resolved]}, mode.ops


def test_kernel_choice_follows_the_machine():
    """auto takes int8pack only where ATen vectorizes it (AVX-512, ARM): on an AVX2-only x86 CPU its
    scalar fallback is slower than fp32, so FBGEMM (vectorized on AVX2) must be chosen there."""
    arm = platform.machine().lower() in ("arm64", "aarch64")
    vectorized_int8pack = arm or torch.backends.cpu.get_cpu_capability() == "AVX512"
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    choice = pick_kernel("cpu")
    if not vectorized_int8pack:
        assert choice == ("fbgemm" if fbgemm else "dequant")
    else:
        assert choice == "int8pack"
    assert pick_kernel("meta") == "dequant"  # not a CPU: the reference path (GPUs take it too)
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        Int8Linear(4, 4, kernel="fast")


def test_float_loader_refuses_an_int8_artifact(tmp_path):
    """model.io loads float artifacts only; the int8 loader is chosen where backends are (eval/)."""
    from model.io import ArtifactError

    art = tiny_random(tmp_path / "f")
    model, meta = load_model(art)
    out = save_quantized(tmp_path / "q", quantize_model(model), meta)
    with pytest.raises(ArtifactError, match="int8 artifact; load it through eval"):
        load_model(out)
