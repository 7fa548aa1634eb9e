"""Weight-only int8 quantization: per-output-channel scales for every Linear (and the tied head).

Storage (the artifact, metadata {"quantization": "int8"}): each quantized Linear keeps
    <name>.weight  int8 (out, in)     round(w / scale), symmetric, clamped to [-127, 127]
    <name>.scale   float32 (out,)     max |w| of the output row / 127
    <name>.bias    float32 (out,)     unchanged
the recipe of gpt-fast's `WeightOnlyInt8QuantHandler` (pytorch-labs/gpt-fast, quantize.py). With a tied
head the token table is stored once, as int8 rows with one scale per row: the same tensors serve the
embedding lookup (a row times its scale) and the output projection (a per-output-channel Linear).

Compute: the storage is kernel-independent; the matmul is picked per machine (`kernel=`):
- "int8pack": torch._weight_int8pack_mm (gpt-fast's CPU path), weight-only: fp32 activations times int8
  weights, dequantized inside the kernel. Vectorized on AVX-512 and ARM CPUs only; on an AVX2-only
  x86 CPU ATen falls back to a scalar loop. Even on AVX-512 it lost to fp32 (docs/benchmarks.md).
- "fbgemm": FBGEMM's dynamic int8 GEMM (torch.ops.quantized.linear_dynamic): activations quantized
  per tensor to 7-bit (reduce_range; AVX2 has no VNNI and would saturate int16 accumulators), int8
  x int8 -> int32, rescaled to fp32. Vectorized on AVX2 and AVX-512. These are the kernels, not the
  deprecated torch.ao.quantization flow: no observers, no module swapping API.
- "dequant": F.linear(x, weight.to(x.dtype) * scale): the reference, the path on GPUs, and a prefill
  path (a long prompt amortizes the dequantization over its rows).
- "float": the dequantized weight kept in memory in fp32, F.linear: fp32's own speed at 4x that
  layer's memory. Only tune_kernels picks it, for layers where no int8 kernel beats it (small ones,
  whose time is per-call overhead), so that int8 is never slower than fp32.
"auto" takes the static rule of pick_kernel; tune_kernels (run by eval's int8 backend at load) then
times the candidates on this CPU, once per layer shape, separately for decode (a few rows) and
prefill (many rows: Int8Linear.prefill_kernel from PREFILL_ROWS rows on).
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT
from model.io import ArtifactError, load_state, save_artifact, to_empty

KERNELS = ("auto", "int8pack", "fbgemm", "dequant", "float")
QUANTIZATION = "int8"
PREFILL_ROWS = 16  # from this many rows (batch x tokens) on, a call is a prefill: Int8Linear.prefill_kernel


def pick_kernel(device: torch.device | str = "cpu") -> str:
    """The static rule, before any timing: FBGEMM on x86 (vectorized on AVX2 and AVX-512), int8pack on
    ARM (where FBGEMM does not exist), the reference elsewhere (GPUs)."""
    if torch.device(device).type != "cpu":
        return "dequant"
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "int8pack"
    if "fbgemm" in torch.backends.quantized.supported_engines:
        return "fbgemm"
    return "dequant"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (int8 (out, in), float32 scale (out,)), symmetric per output channel.
    The int8 weight is row-major whatever w's strides (the fp32 backend may have re-laid w out in
    eval/backends.py): _weight_int8pack_mm accepts only a contiguous (out, in) weight."""
    w = w.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (out,); an all-zero row keeps scale > 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one float32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "auto", device=None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}; choose one of {KERNELS}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.kernel = pick_kernel(self.weight.device) if kernel == "auto" else kernel
        self.prefill_kernel = self.kernel  # for calls of PREFILL_ROWS rows or more; tune_kernels may change it
        self.tunable = kernel == "auto"  # tune_kernels only re-chooses what the caller left to the machine
        self._packed = None  # FBGEMM's prepacked weight, built on first use (after load_state_dict)
        self._float = None  # the "float" kernel's fp32 weight, built on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel, linear.weight.device)
        q.weight, q.scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            q.bias = linear.bias.detach().float().clone()
        return q

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = self._float = None  # new weights: repack
        super()._load_from_state_dict(*args, **kwargs)

    def _fbgemm_weight(self):
        if self._packed is None:
            with warnings.catch_warnings():  # quantized-tensor constructors warn about their future
                warnings.simplefilter("ignore")
                zero = torch.zeros(self.out_features, dtype=torch.long)
                qw = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zero, 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        kernel = self.kernel if x.numel() < PREFILL_ROWS * self.in_features else self.prefill_kernel
        if kernel == "float" and self._float is not None and x.dtype == torch.float32:
            return F.linear(x, self._float, self.bias)  # the decode step's common case, first
        return self.run(kernel, x)

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        """x through the named kernel (kernels that do not apply to x's dtype / device use the reference)."""
        cpu = x.device.type == "cpu"
        if kernel == "fbgemm" and x.dtype == torch.float32 and cpu:
            return torch.ops.quantized.linear_dynamic(x, self._fbgemm_weight(), True)
        if kernel == "int8pack" and x.dtype in (torch.float32, torch.bfloat16) and cpu:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scale.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)  # (..., out)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        if kernel == "float" and x.dtype == torch.float32:
            if self._float is None:
                w = self.weight.float() * self.scale[:, None]  # (out, in)
                # eval.backends.decode_layout's stride choice for fp32 Linears, for the same reason
                self._float = w.t().contiguous().t() if self.out_features >= self.in_features else w
            return F.linear(x, self._float, self.bias)
        w = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]  # (out, in): the reference
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}, prefill_kernel={self.prefill_kernel}"
        )


def time_kernel(q: Int8Linear, kernel: str, rows: int) -> float:
    """Seconds of one call of `kernel` on `rows` random rows."""
    x = torch.randn(rows, q.in_features, device=q.weight.device)
    t0 = time.perf_counter()
    q.run(kernel, x)
    return time.perf_counter() - t0


ROUNDS = 5  # timings per candidate; the fastest counts (timeit's rule)


_TUNED: dict[tuple, tuple[str, str]] = {}  # (in, out, bias, device) -> (decode, prefill kernel), per process


def candidates(device: torch.device) -> tuple[list[str], list[str]]:
    """(decode, prefill) kernels worth timing on this device. int8pack is a weight-only matrix-vector
    kernel: not a prefill candidate, as a matrix-vector kernel loses to fp32 matmul once there are many rows
    (docs/inference.md)."""
    if device.type != "cpu":
        return ["dequant"], ["dequant"]
    fbgemm = ["fbgemm"] if "fbgemm" in torch.backends.quantized.supported_engines else []
    return [*fbgemm, "int8pack", "float"], [*fbgemm, "dequant", "float"]


@torch.no_grad()
def tune_kernels(model: nn.Module, timer=time_kernel, prefill_rows: int = 64) -> dict[tuple, tuple[str, str]]:
    """Choose each tunable Int8Linear's decode and prefill kernel by timing the candidates on this machine
    (once per layer shape and process), so int8 runs at the speed of its fastest path, never below
    fp32 ("float" is a candidate). timer(layer, kernel, rows) -> seconds of one call. Returns the choices."""
    chosen = {}
    for mod in model.modules():
        if not (isinstance(mod, Int8Linear) and mod.tunable):
            continue
        key = (mod.in_features, mod.out_features, mod.bias is not None, str(mod.weight.device))
        picks = _TUNED.get(key) if timer is time_kernel else None
        if picks is None:
            decode, prefill = candidates(mod.weight.device)
            picks = []
            for rows, kernels in ((1, decode), (prefill_rows, prefill)):
                for k in kernels:
                    timer(mod, k, rows)  # first call: packing, allocation
                # Round-robin, as eval.bench does: a slow spell of a shared CPU hits every candidate
                # alike. A candidate 3x slower than the best so far is dropped (a scalar fallback can
                # be 100x slower: it is not timed at length).
                best = dict.fromkeys(kernels, float("inf"))
                alive = list(kernels)
                for _ in range(ROUNDS):
                    for k in alive:
                        best[k] = min(best[k], timer(mod, k, rows))
                    alive = [k for k in alive if best[k] <= 3 * min(best.values())]
                picks.append(min(best, key=best.get))
            if timer is time_kernel:
                _TUNED[key] = tuple(picks)
        mod.kernel, mod.prefill_kernel = picks
        if "float" not in (mod.kernel, mod.prefill_kernel):
            mod._float = None  # timing built it; keep only what a chosen kernel uses
        chosen[key] = (mod.kernel, mod.prefill_kernel)
    return chosen


class Int8Embedding(nn.Module):
    """The tied token table as int8 rows with per-row scales; a lookup dequantizes only the rows used."""

    def __init__(self, num: int, dim: int, device=None):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num, dtype=torch.float32, device=device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx (B, T) -> (B, T, C) float32
        return F.embedding(idx, self.weight).float() * self.scale[idx][..., None]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_model(model: GPT, head: bool = True, kernel: str = "auto") -> GPT:
    """Swap every Linear of the blocks (and the head if `head`) for Int8Linear, in place.

    A tied head shares its int8 table with an Int8Embedding, so the file stores it once. The
    untied token table stays float: it is a lookup, not a matmul, and costs no decode time."""
    if model.config.n_experts:  # experts are 3-D parameters, not Linears: they would stay float unnoticed
        raise UserError(
            "int8 quantization does not cover mixture-of-experts weights (model.n_experts > 0); "
            "use the float model (--backend torch)"
        )
    tied = model.config.tie_embeddings
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            _replace(model, name, Int8Linear.from_linear(mod, kernel))
    if head:
        q = Int8Linear.from_linear(model.lm_head, kernel)
        if tied:
            emb = Int8Embedding(*q.weight.shape, device=q.weight.device)
            emb.weight, emb.scale = q.weight, q.scale  # the same tensors, stored once
            model.transformer.wte = emb
        model.lm_head = q
    model.quantized_head = head  # read by quantized_state_dict / save_quantized
    return model.eval()


def quantized_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict to save: a tied int8 head is stored once, under transformer.wte."""
    sd = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
    return sd


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every Linear's weight (+ int8 scales), counting a tied table once: the size goal's measure."""
    seen, total = set(), 0
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, Int8Linear)):
            tensors = [mod.weight] + ([mod.scale] if isinstance(mod, Int8Linear) else [])
            for t in tensors:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def save_quantized(
    out_dir: str | os.PathLike, model: GPT, metadata: dict | None = None, overwrite: bool = False
) -> Path:
    """Write a quantized model as an artifact whose metadata says int8 (atomic, like every artifact)."""
    meta = {**(metadata or {}), "quantization": QUANTIZATION, "quantized_head": bool(model.quantized_head)}
    cfg = model.config
    # save_artifact drops lm_head.weight for tied configs; quantized_state_dict already did.
    return save_artifact(out_dir, quantized_state_dict(model), cfg, meta, overwrite=overwrite)


def empty_quantized(config: ModelConfig, head: bool, kernel: str = "auto", device="cpu") -> GPT:
    """A quantized GPT with the structure of the config and uninitialized weights (to load into)."""
    with torch.device("meta"):
        model = GPT(config)
    to_empty(model, device)
    if config.tie_embeddings:  # to_empty gives each module its own tensor: tie again (as model.io.load_model does)
        model.lm_head.weight = model.transformer.wte.weight
    model.init_weights()  # real values for the non-persistent RoPE tables; the rest is overwritten
    return quantize_model(model, head=head, kernel=kernel)


def load_quantized(path: str | os.PathLike, device="cpu", kernel: str = "auto") -> tuple[GPT, dict]:
    """(quantized GPT in eval mode, metadata) from an int8 artifact (any path model.io.resolve accepts)."""
    config, sd, metadata = load_state(path)
    return from_quantized_state(config, sd, metadata, device=device, kernel=kernel, where=str(path))


def from_quantized_state(
    config: ModelConfig,
    sd: dict[str, torch.Tensor],
    metadata: dict,
    device="cpu",
    kernel: str = "auto",
    where: str = "the artifact",
) -> tuple[GPT, dict]:
    """(quantized GPT in eval mode, metadata) from an int8 artifact's loaded contents."""
    if metadata.get("quantization") != QUANTIZATION:
        raise ArtifactError(f"{where} is not an int8 artifact (quantization={metadata.get('quantization')!r})")
    model = empty_quantized(config, head=bool(metadata.get("quantized_head", True)), kernel=kernel, device=device)
    expected = quantized_state_dict(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{where}: int8 weights do not match the config (missing {missing}, unexpected {unexpected})"
        )
    model.load_state_dict(sd, strict=False)  # a tied lm_head's buffers are the wte ones, loaded in place
    return model.eval(), metadata
