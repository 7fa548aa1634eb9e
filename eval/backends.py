"""Inference backends behind one interface: torch (fp32 / bf16), torch int8, ONNX Runtime.

A backend holds the decoding state of one batch. `prefill` runs the (left-padded) prompts once and
fills the KV cache; each `decode` call feeds one new token per row. `forward` is the plain
full-sequence pass (no cache), used by evaluation and the no-cache reference loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from eval.cli import UsageError
from model import GPT, dtypes
from model.generation import CachedDecoder
from model.onnx_export import DECODER, FULL, past_names, session

BACKENDS = ("torch", "int8", "onnx")
DTYPES = {dtypes.short(n): dtypes.torch_dtype(n) for n in ("float32", "bfloat16")}  # the torch backend's


class Backend:
    """The interface; see the module docstring. Logits are float32 (B, vocab_size) or (B, T, vocab_size)."""

    name: str
    vocab_size: int
    block_size: int
    tokenizer: str | None  # the spec for data.tokenizer.get_tokenizer, from the artifact / ONNX metadata

    def prefill(self, tokens: torch.Tensor, left_pad: torch.Tensor, max_len: int) -> torch.Tensor:
        """tokens (B, T) int64, left_pad (B,) -> logits of the last position (B, V); room for max_len."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor, slot: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, 1) int64, the next token of every row -> logits (B, V); slot (B,): each row's cache
        slot, None: the batch's next (model.generation.Decoder)."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V), no cache."""
        raise NotImplementedError


def decode_layout(model: torch.nn.Module) -> None:
    """Store the fp32 weight of every Linear with out_features >= in_features as the transpose of a
    contiguous (in, out) matrix (same values and shape, other strides), in place.

    Decoding a few rows is a matrix-vector product that streams every weight from DRAM once per token.
    On the bench's CPU (MKL sgemv, AVX2) the (in, out) layout streams faster when the output side is
    the longer one (the other Linears stream faster as they are): gpt2 decode at batch 1 gains
    (docs/benchmarks.md), while long prompts, matrix-matrix products, run as fast as before.
    ONNX Runtime prepacks its weights for the same reason. A tied head stays tied: the Parameter
    itself is re-strided.
    """
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight
            if (
                w.dtype == torch.float32
                and w.device.type == "cpu"
                and mod.out_features >= mod.in_features
                and w.is_contiguous()
            ):
                w.data = w.data.t().contiguous().t()  # (out, in) with strides (1, out)


class TorchBackend(CachedDecoder, Backend):
    """A GPT (float or int8-quantized) with the preallocated in-place KVCache: model.generation's
    CachedDecoder, which decodes through GPT.forward (compile: the decode step compiled, dynamic shapes).

    A float32 model on the CPU has its Linear weights re-strided for decoding (decode_layout); an int8
    model has each layer's fastest kernel chosen on this CPU (tune_kernels)."""

    def __init__(self, model: GPT, metadata: dict, name: str = "torch", compile: bool = False):
        super().__init__(model.eval(), compile=compile)
        self.name = name
        self.tokenizer = metadata.get("tokenizer")
        if self.dtype == torch.float32 and self.device.type == "cpu":
            decode_layout(model)
        if name == "int8":
            from model.quantize import tune_kernels

            tune_kernels(model)  # each layer's fastest int8 path on this CPU, for decode and for prefill

    @torch.inference_mode()
    def forward(self, idx):
        return self.model(idx.to(self.device)).float()


class OnnxBackend(Backend):
    """The KV-cache decoder graph under ONNX Runtime; needs only the .onnx file (see model/onnx_export.py)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        try:
            self.sess = session(self.path, threads)
        except Exception as e:  # onnxruntime's own types (InvalidProtobuf, Fail, ...) for foreign files
            raise UsageError(
                f"{self.path} is not an ONNX model onnxruntime can load ({str(e).splitlines()[0][:200]})"
            ) from None
        meta = dict(self.sess.get_modelmeta().custom_metadata_map)
        kind = meta.get("gptrain.graph")
        if kind not in (DECODER, FULL):
            raise UsageError(f"{self.path} was not written by python -m eval.export (no gptrain metadata)")
        self.kind = kind
        self.name = "onnx-int8" if meta.get("gptrain.quantization") == "int8" else "onnx"
        self.tokenizer = meta.get("tokenizer")
        self.vocab_size, self.block_size = int(meta["gptrain.vocab_size"]), int(meta["gptrain.block_size"])
        self.n_layer, self.n_kv_head = int(meta["gptrain.n_layer"]), int(meta["gptrain.n_kv_head"])
        self.head_dim = int(meta["gptrain.head_dim"])
        self.past: list = []  # past_key_0, past_value_0, ... as onnxruntime OrtValues
        self.past_names = past_names(self.n_layer)
        self.output_names = [o.name for o in self.sess.get_outputs()]
        # doc_mask models: the decoder graph also carries each row's document (model/onnx_export.py)
        self.documents = "document" in {i.name for i in self.sess.get_inputs()}
        self.doc: np.ndarray | None = None
        self.pos = 0
        self.pad = np.zeros(1, dtype=np.int64)

    def _need_decoder(self) -> None:
        if self.kind != DECODER:
            raise UsageError(
                f"{self.path} is the full-sequence graph, which has no KV cache; "
                "generate with the decoder graph (decoder.onnx) written beside it"
            )

    def run(self, tokens: np.ndarray, position: np.ndarray, past: list, document: np.ndarray | None):
        """One call of the decoder graph -> (logits (B, T, V), presents, next_document (B,) or None).

        IOBinding keeps the presents inside onnxruntime (OrtValues), so that they are bound as the next
        step's pasts with no copy of the whole cache into numpy and back on every token; a past may be
        numpy (a new batch) or OrtValues (the last step's presents)."""
        io = self.sess.io_binding()
        io.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        io.bind_cpu_input("position", np.ascontiguousarray(position, dtype=np.int64))
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                io.bind_ortvalue_input(name, value)
        if self.documents:
            io.bind_cpu_input("document", np.ascontiguousarray(document, dtype=np.int64))
        for name in self.output_names:
            io.bind_output(name)
        self.sess.run_with_iobinding(io)
        logits, *presents = io.get_outputs()
        doc = presents.pop().numpy() if self.documents else None
        return logits.numpy(), presents, doc

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """The past of a prefill: 2L arrays (batch, Hkv, 0, D)."""
        return [np.zeros((batch, self.n_kv_head, 0, self.head_dim), dtype=np.float32)] * (2 * self.n_layer)

    def prefill(self, tokens, left_pad, max_len):
        self._need_decoder()
        B, T = tokens.shape
        self.pad = left_pad.cpu().numpy().astype(np.int64)
        logits, self.past, self.doc = self.run(tokens.cpu().numpy(), -self.pad, self.empty_past(B), np.zeros(B))
        self.pos = T
        return torch.from_numpy(logits[:, -1])  # (B, V)

    def decode(self, tokens, slot=None):
        at = self.pos if slot is None else slot.cpu().numpy()
        logits, self.past, self.doc = self.run(tokens.cpu().numpy(), at - self.pad, self.past, self.doc)
        if slot is None:
            self.pos += 1
        return torch.from_numpy(logits[:, -1])  # (B, V)

    def forward(self, idx):
        x = idx.cpu().numpy()
        if self.kind == FULL:
            (logits,) = self.sess.run(None, {"tokens": x})
            return torch.from_numpy(logits)
        B = x.shape[0]
        return torch.from_numpy(self.run(x, np.zeros(B), self.empty_past(B), np.zeros(B))[0])


def find_onnx(path: str | os.PathLike, int8: bool = False) -> Path:
    """An .onnx file, or the decoder graph inside a directory written by eval.export."""
    p = Path(path)
    if p.is_dir():
        name = "decoder.int8.onnx" if int8 else "decoder.onnx"
        if not (p / name).is_file():
            raise UsageError(
                f"{p} holds no {name}; write it with python -m eval.export --format onnx "
                f"{'--int8 ' if int8 else ''}--out {p}"
            )
        return p / name
    if not p.is_file():
        raise UsageError(f"{p} does not exist; pass an .onnx file written by python -m eval.export")
    return p


def load_backend(
    backend: str,
    ckpt: str | None = None,
    onnx: str | None = None,
    dtype: str = "fp32",
    compile: bool = False,
    device: str = "cpu",
    threads: int | None = None,
) -> Backend:
    """The backend named `backend` for a checkpoint (torch, int8) or an exported graph (onnx)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if backend == "onnx":
        if onnx is None:
            raise UsageError("--backend onnx needs --onnx FILE (write one with python -m eval.export --format onnx)")
        if device != "cpu":
            raise UsageError("the onnx backend runs on the CPU (onnxruntime's CPU provider); drop --device")
        return OnnxBackend(find_onnx(onnx), threads)
    if ckpt is None:
        raise UsageError(f"--backend {backend} needs --ckpt (a run directory, checkpoint or model artifact)")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"unknown --device {device!r}; use cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    model, meta = load_checkpoint_model(ckpt, device)
    if backend == "int8":
        if dtype != "fp32":
            raise UsageError("the int8 backend computes in float32 activations; drop --dtype")
        if meta.get("quantization") != "int8":
            from model.quantize import quantize_model

            model = quantize_model(model)  # a float checkpoint, quantized on load
        return TorchBackend(model, meta, name="int8", compile=compile)
    if meta.get("quantization") == "int8":
        if dtype != "fp32":
            raise UsageError(f"{ckpt} is an int8 artifact; it runs with float32 activations only")
        return TorchBackend(model, meta, name="int8", compile=compile)
    model = model.to(DTYPES[dtype])
    return TorchBackend(model, meta, name="torch" if dtype == "fp32" else f"torch-{dtype}", compile=compile)


def load_checkpoint_model(ckpt: str, device: str = "cpu"):
    """(model in eval mode, metadata) from any path model.io.resolve accepts: the loader is chosen
    by the artifact's quantization (here, where backends are chosen; model.io loads float only)."""
    from model.io import ArtifactError, load_model, read_config, resolve

    artifact = resolve(ckpt)
    _, meta = read_config(artifact)
    quantization = meta.get("quantization")
    if quantization == "int8":
        from model.quantize import load_quantized

        return load_quantized(artifact, device=device)
    if quantization:
        raise ArtifactError(f"{ckpt}: unknown quantization {quantization!r} (known: int8)")
    return load_model(artifact, device=device)
