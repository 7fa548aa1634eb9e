"""ONNX export: both graphs match torch, int8 keeps the argmax and the loss, ORT generation equals
torch generation token for token; torch.export (.pt2) round trip."""

import time

import numpy as np
import pytest
import torch
from _eval_fixtures import shared_trained, tiny_random
from conftest import require_extra

require_extra("onnxruntime", "onnx")

from eval.backends import OnnxBackend, TorchBackend  # noqa: E402
from eval.export import export_onnx, export_pt2, val_agreement  # noqa: E402
from eval.generate import generate  # noqa: E402
from model.io import load_model  # noqa: E402
from model.onnx_export import check_parity, export_decoder, read_metadata  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The trained tiny model exported once (fp32 + int8, checked by export_onnx itself)."""
    from data.loader import val_batches

    art, data = shared_trained(tmp_path_factory)
    model, meta = load_model(art)
    batches = list(val_batches(data, seq_len=64, batch_size=4, max_batches=8))
    out = tmp_path_factory.mktemp("onnx")
    files = export_onnx(model, meta, out, int8=True, batches=batches, force=False, log=lambda *_: None)
    return model, meta, out, files, batches


def test_files_written_and_metadata_travels(exported):
    model, meta, out, files, _ = exported
    assert sorted(f.name for f in files) == ["decoder.int8.onnx", "decoder.onnx", "model.int8.onnx", "model.onnx"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-export")], "temp dir left behind"
    md = read_metadata(out / "decoder.onnx")
    assert md["tokenizer"] == "bytes" and md["gptrain.graph"] == "decoder"
    assert read_metadata(out / "decoder.int8.onnx")["gptrain.quantization"] == "int8"
    # (this tiny model is 1/3 float token / position tables, which dynamic quantization leaves float)
    assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size


def test_fp32_parity_both_graphs(exported):
    model, _, out, _, _ = exported
    assert check_parity(model, out / "model.onnx", out / "decoder.onnx", seed=123) <= 1e-3
    # dynamic batch and length: a shape never seen at export time, through the decoder as a full pass
    x = torch.randint(0, 257, (5, 64))
    for name in ("model.onnx", "decoder.onnx"):
        got = OnnxBackend(out / name).forward(x)
        assert (got - model(x)).abs().max().item() <= 1e-3


def test_int8_graphs_keep_argmax_and_loss(exported):
    model, _, out, _, batches = exported
    for name in ("model.int8.onnx", "decoder.int8.onnx"):
        agree, ref, got = val_agreement(model, OnnxBackend(out / name).forward, batches)
        assert agree >= 0.99 and abs(got - ref) / ref <= 0.01, (name, agree, ref, got)


def test_onnx_generation_equals_torch_token_for_token(exported):
    model, meta, out, _, _ = exported
    prompts = [list(b"def main():\n    "), list(b"import "), list(b"The Python ")]
    ort, pt = OnnxBackend(out / "decoder.onnx"), TorchBackend(model, meta)
    assert generate(ort, prompts, 40, temperature=0) == generate(pt, prompts, 40, temperature=0)
    # sampling: same seed, same backend -> same tokens
    a = generate(ort, prompts[:1], 20, temperature=1.0, top_k=20, seed=3)
    assert a == generate(ort, prompts[:1], 20, temperature=1.0, top_k=20, seed=3)


def test_full_graph_cannot_generate(exported):
    _, _, out, _, _ = exported
    with pytest.raises(ValueError, match="decoder.onnx"):
        generate(OnnxBackend(out / "model.onnx"), [[1, 2]], 3)


def test_modern_family_decoder_parity(tmp_path):
    """RoPE with per-row positions, grouped-query attention, untied head, through the decoder graph."""
    model, meta = load_model(tiny_random(tmp_path / "m", family="modern", n_layer=1))
    dec = export_decoder(model, tmp_path / "decoder.onnx", meta)
    assert check_parity(model, None, dec) <= 1e-3
    be = OnnxBackend(dec)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    assert generate(be, prompts, 10, temperature=0) == generate(TorchBackend(model, meta), prompts, 10, temperature=0)


def test_pt2_round_trip(exported, tmp_path):
    model, meta, _, _, _ = exported
    (path,) = export_pt2(model, meta, tmp_path, force=False, log=lambda *_: None)
    extra = {"gptrain.json": ""}
    ep = torch.export.load(str(path), extra_files=extra)
    assert '"tokenizer": "bytes"' in extra["gptrain.json"]
    for shape in ((1, 9), (4, 64)):
        x = torch.randint(0, 257, shape)
        np.testing.assert_allclose(ep.module()(x).detach().numpy(), model(x).detach().numpy(), atol=1e-5)


def test_doc_mask_decoder_carries_the_document(tmp_path):
    """A doc_mask model's decoder graph takes and returns each row's document: prompts with an
    <|endoftext|> inside (one left-padded) decode through ONNX Runtime, step after step, as the torch
    no-cache forward with the mask does, also through the server's ONNX engine."""
    from eval.generate import generate_no_cache
    from eval.serve.batching import Seq
    from eval.serve.batching_onnx import OnnxEngine

    eot = 256
    model, meta = load_model(
        tiny_random(tmp_path / "m", family="modern", n_layer=1, doc_mask=True, doc_positions_restart=True, eot_id=eot)
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)  # a lively model: tokens depend on the context
    dec = export_decoder(model, tmp_path / "decoder.onnx", meta)
    be = OnnxBackend(dec)
    assert be.documents
    prompts = [[5, 6, 7, eot, 8, 9], [10, eot, 11]]
    want = [generate_no_cache(lambda x: model(x), p, 10, model.config.block_size) for p in prompts]
    assert generate(be, prompts, 10, temperature=0) == want
    engine = OnnxEngine(be, max_batch=2).start()
    try:
        seqs = [Seq(p, 10, temperature=0) for p in prompts]
        done = []
        for s in seqs:
            s.on_finish = lambda s, _r: done.append(s)
        engine.submit(seqs)
        deadline = time.monotonic() + 120  # a dead engine thread must fail the test, not hang it
        while len(done) < 2 and engine.thread.is_alive() and time.monotonic() < deadline:
            engine.thread.join(0.05)
    finally:
        engine.stop()
    assert [s.tokens for s in seqs] == want
