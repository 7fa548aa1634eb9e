"""ONNX export: a full-sequence graph and a KV-cache decoder graph, int8 by ONNX Runtime, parity checks.

The decoder is the functional form of the KV cache: past keys/values in, present keys/values out
(the layout of Hugging Face Optimum's decoder-with-past exports). Positions and masks are the KV
cache's (model.gpt.cache_layout, the function torch decoding and the server use); an ONNX graph cannot
mutate its inputs, so where torch writes into the preallocated KVCache in place, GPT.trunk here gets a
kv_update callback that concatenates past and new keys/values and records the result.

Decoder inputs / outputs (L layers, Hkv kv heads, D head dim, P past length, S = P + T):
    tokens              int64 (B, T)
    position            int64 (B,)      position of tokens[:, 0] in each row; a row left-padded by n
                                        slots has position -n at prefill (its first n slots are masked)
    past_key_i          float32 (B, Hkv, P, D), i = 0 .. L-1, and past_value_i the same
    document            int64 (B,)      doc_mask models only: the position at which the document of
                                        each row's last past token opened (0 at prefill)
 -> logits              float32 (B, T, vocab)
    present_key_i       float32 (B, Hkv, S, D), and present_value_i
    next_document       int64 (B,)      doc_mask models only: the next call's `document`
One tensor per layer, not one (L, ...) stack: stacking and splitting copied the whole cache twice more
per token (onnxruntime's profiler showed Split + Concat taking most of a batch-8 step).
Prefill is the same graph with P = 0. The tokenizer spec and the shapes travel in metadata_props,
so that ONNX Runtime generation needs no torch model and no artifact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from model.errors import UserError
from model.gpt import GPT, KVCache, cache_layout

FULL, DECODER = "full", "decoder"
# Opset 23 has a native Attention op, which the exporter emits for F.scaled_dot_product_attention and
# onnxruntime runs as one kernel; at opset 18 the decomposed attention transposed the whole key cache
# every step (measurably slower decode in eval.bench).
OPSET = 23


def past_names(n_layer: int, prefix: str = "past") -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (or present_...): the decoder's cache tensors in order."""
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


class FullSequence(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab): the forward pass without a cache (GPT.forward's, document
    masking included)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos, mask, is_causal = self.model.window(tokens, flex=False)  # (T,) or (B, T); None or (B, 1, T, T)
        return self.model.head(self.model.trunk(tokens, pos, None, mask, is_causal))  # (B, T, V)


class KVDecoder(nn.Module):
    """The past-in / present-out decoder described in the module docstring."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: torch.Tensor,
        position: torch.Tensor,
        past: list[torch.Tensor],
        document: torch.Tensor | None = None,
    ) -> tuple:
        """past = [key_0, value_0, key_1, ...], each (B, Hkv, P, D) -> (logits (B, T, V), presents),
        and with doc_mask document (B,) -> (logits, presents, next_document (B,))."""
        T, P = tokens.shape[1], past[0].shape[2]
        # The past as a KVCache whose tensors are the inputs: the new tokens sit at slot P of every
        # row, and a row that starts at position `position` has P - position slots of left padding.
        start = P - position  # (B,) first real slot of each row
        cache = KVCache.row_state(self.model.config, P + T, start, None if document is None else start + document)
        presents: list[torch.Tensor] = []

        def kv_update(layer: int, k: torch.Tensor, v: torch.Tensor):  # k, v (B, Hkv, T, D)
            k_all = torch.cat([past[2 * layer], k], dim=2)  # (B, Hkv, S, D)
            v_all = torch.cat([past[2 * layer + 1], v], dim=2)
            presents.extend((k_all, v_all))
            return k_all, v_all

        pos, mask, is_causal, doc, _ = cache_layout(tokens, P, cache)  # (B, T), (B, 1, T, S), (B, T)
        h = self.model.trunk(tokens, pos, kv_update, attn_mask=mask, is_causal=is_causal)  # (B, T, C)
        if document is None:
            return self.model.head(h), presents  # (B, T, V), [(B, Hkv, S, D)] * 2L
        return self.model.head(h), presents, doc[:, -1] - start


def graph_metadata(model: GPT, kind: str, metadata: dict | None = None) -> dict[str, str]:
    cfg = model.config
    meta = {
        "gptrain.graph": kind,
        "gptrain.vocab_size": str(cfg.vocab_size),
        "gptrain.block_size": str(cfg.block_size),
        "gptrain.n_layer": str(cfg.n_layer),
        "gptrain.n_kv_head": str(cfg.n_kv_head),
        "gptrain.head_dim": str(cfg.head_dim),
        "gptrain.quantization": "none",
    }
    if metadata and metadata.get("tokenizer"):
        meta["tokenizer"] = str(metadata["tokenizer"])
    return meta


def set_metadata(path: str | os.PathLike, props: dict[str, str]) -> None:
    """Add / replace metadata_props of an ONNX file in place (it is a fresh temp file here)."""
    import onnx

    m = onnx.load(str(path))
    existing = {p.key: p for p in m.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = v
        else:
            m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """metadata_props of an ONNX file, through ONNX Runtime (no torch needed)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's and the quantizer's advice (torchvision ops, pre-processing hints)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def refuse_moe(model: GPT) -> None:
    """The MoE block sorts tokens by expert into data-dependent group sizes, which the exported graph
    does not express: refused in one line rather than exported wrong."""
    if model.config.n_experts:
        raise UserError(
            "ONNX export does not support mixture-of-experts blocks (model.n_experts > 0); "
            "serve it with the torch backend"
        )


def _export(
    module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str], dynamic_shapes: dict
) -> None:
    with _quiet():
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
            external_data=False,
            opset_version=OPSET,
        )
        # One self-contained file (protobuf's 2 GB limit allows up to ~gpt2-large in fp32).
        prog.save(str(path), external_data=False)


@torch.no_grad()
def export_full(model: GPT, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Export the full-sequence graph (dynamic batch and sequence length) to `path`."""
    refuse_moe(model)
    path = Path(path)
    model = model.float().eval()
    B, T = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=model.config.block_size)
    tokens = torch.randint(0, model.config.vocab_size, (2, 5))
    _export(FullSequence(model), (tokens,), path, ["tokens"], ["logits"], {"tokens": {0: B, 1: T}})
    set_metadata(path, graph_metadata(model, FULL, metadata))
    return path


def decoder_example(model: GPT, batch: int = 2, seq: int = 3, past: int = 4):
    cfg = model.config
    shape = (batch, cfg.n_kv_head, past, cfg.head_dim)
    document = (torch.zeros(batch, dtype=torch.long),) if cfg.doc_mask else ()
    return (
        torch.randint(0, cfg.vocab_size, (batch, seq)),
        torch.full((batch,), past, dtype=torch.long),
        [torch.randn(shape) for _ in range(2 * cfg.n_layer)],
        *document,
    )


def decoder_names(cfg) -> tuple[list[str], list[str]]:
    """(input names, output names) of the decoder graph of a model with this config, in order."""
    doc_in, doc_out = (["document"], ["next_document"]) if cfg.doc_mask else ([], [])
    return (
        ["tokens", "position", *past_names(cfg.n_layer), *doc_in],
        ["logits", *past_names(cfg.n_layer, "present"), *doc_out],
    )


@torch.no_grad()
def export_decoder(model: GPT, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Export the KV-cache decoder graph (dynamic batch, new length and past length) to `path`."""
    refuse_moe(model)
    path = Path(path)
    model = model.float().eval()
    cfg = model.config
    B = torch.export.Dim("batch", min=1, max=1024)
    T = torch.export.Dim("seq", min=1, max=cfg.block_size)
    P = torch.export.Dim("past", min=0, max=cfg.block_size)
    dyn = {"tokens": {0: B, 1: T}, "position": {0: B}, "past": [{0: B, 2: P}] * (2 * cfg.n_layer)}
    if cfg.doc_mask:
        dyn["document"] = {0: B}
    inputs, outputs = decoder_names(cfg)
    _export(KVDecoder(model), decoder_example(model), path, inputs, outputs, dyn)
    set_metadata(path, graph_metadata(model, DECODER, metadata))
    return path


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ONNX Runtime dynamic int8 quantization (int8 per-channel weights, uint8 dynamic activations).

    reduce_range (7-bit weights): x86 CPUs without VNNI multiply u8 x s8 with vpmaddubsw, whose int16
    sums saturate at full range (onnxruntime's quantization docs, "when to use reduce-range"); the
    argmax agreement with the float model drops markedly without it (tests/test_onnx.py checks it).
    The output projection stays float: with per-tensor uint8 activations into the vocabulary-wide
    head the argmax moves on about twice as many val positions. (A tied head reads
    the token table through a Transpose, which quantize_dynamic would leave float anyway.)"""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with _quiet():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=head_nodes(src),
        )
    props = read_metadata(src)
    props["gptrain.quantization"] = "int8"
    set_metadata(dst, props)
    return dst


def head_nodes(path: str | os.PathLike) -> list[str]:
    """Names of the MatMul / Gemm nodes that produce the graph's logits (walking back through reshapes,
    slices and casts), so that quantization can leave the output projection alone."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    frontier, found = ["logits"], []
    while frontier:
        n = producer.get(frontier.pop())
        if n is None:
            continue
        if n.op_type in ("MatMul", "Gemm"):
            found.append(n.name)
        elif n.op_type in ("Reshape", "Slice", "Cast", "Identity", "Squeeze", "Unsqueeze", "Add"):
            frontier.extend(i for i in n.input[:1])
    return found


def session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session (intra-op threads default to ORT's choice: the physical cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(
    model: GPT,
    full_path: str | os.PathLike | None,
    decoder_path: str | os.PathLike | None,
    atol: float = 1e-3,
    seed: int = 0,
) -> float:
    """Max |logits_onnx - logits_torch| over random prompts, for each graph given (the fp32 check).

    The decoder is checked the way it is used: a left-padded prefill from an empty past, then
    two single-token steps that feed the presents back as pasts."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    worst = 0.0
    if full_path is not None:
        sess = session(full_path)
        for B, T in ((1, 7), (3, min(cfg.block_size, 19))):
            idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
            ref = FullSequence(model)(idx)
            (got,) = sess.run(None, {"tokens": idx.numpy()})
            worst = max(worst, (torch.from_numpy(got) - ref).abs().max().item())
    if decoder_path is not None:
        sess = session(decoder_path)
        B, T = 3, min(cfg.block_size - 2, 11)
        idx = torch.randint(0, cfg.vocab_size, (B, T + 2), generator=g)
        pad = torch.tensor([0, 2, 5])[:B]
        empty = torch.zeros(B, cfg.n_kv_head, 0, cfg.head_dim).numpy()
        names = past_names(cfg.n_layer)
        feeds = {"tokens": idx[:, :T].numpy(), "position": (-pad).numpy(), **{n: empty for n in names}}
        doc = {"document": torch.zeros(B, dtype=torch.long).numpy()} if cfg.doc_mask else {}
        for _ in range(3):  # the prefill, then two one-token steps
            # (B, T', V), then (B, Hkv, S, D) per layer, k and v, then with doc_mask next_document (B,)
            logits, *presents = sess.run(None, {**feeds, **doc})
            if cfg.doc_mask:
                doc = {"document": presents.pop()}
            S = presents[0].shape[2]
            for b in range(B):  # row b alone, unpadded, through the torch full forward
                ref = model(idx[b : b + 1, pad[b] : S])[0]  # (S - pad_b, V)
                k = min(logits.shape[1], S - pad[b].item())  # its real (non-padding) new positions
                got = torch.from_numpy(logits[b, logits.shape[1] - k :])
                worst = max(worst, (got - ref[-k:]).abs().max().item())
            feeds = {
                "tokens": idx[:, S : S + 1].numpy(),
                "position": (S - pad).numpy(),
                **dict(zip(names, presents, strict=True)),
            }
    return worst
