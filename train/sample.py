"""The text samples in the training log: model.generation's loop on the bare model, or on the decoder the
parallel layout gives (Strategy.sample_decoder) (train/ never imports eval/'s command modules).

The loop and the sampling rule are the ones eval.sample drives: the same model, prompt, seed and
settings give the training log and eval.sample the same tokens (a bf16 run's log samples under the
run's autocast, as its evaluation does, so its tokens are those of the bf16 forward). Each new token
costs one token of compute (model.KVCache), and draws come from the loop's own torch.Generator, so
that sampling never moves the training RNG (exact resume depends on it). Every rank runs it (under FSDP / ZeRO-3 the
forward is a collective); only rank 0 prints.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model import generation


@torch.no_grad()
def generate(
    decoder: generation.CachedDecoder | generation.WindowDecoder | nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 0,
) -> list[int]:
    """Prompt token ids -> the prompt's continuation (new ids only). decoder: a model.generation
    Decoder over a model (the training loop's, from its strategy), or a bare GPT, decoded through its
    KV cache. A fixed number of tokens is drawn (no early stop, no crop), so that every rank runs the
    same forwards."""
    if isinstance(decoder, nn.Module):
        decoder = generation.CachedDecoder(decoder)
    ctx, model = decoder.block_size, decoder.model
    prompt = prompt[-(ctx - 1) :] or [0]  # keep room for at least one new token
    max_new_tokens = min(max_new_tokens, ctx - len(prompt))
    if max_new_tokens <= 0:
        return []
    was_training = model.training
    model.eval()
    try:
        (out,) = generation.generate(
            decoder,
            [prompt],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
    finally:
        model.train(was_training)
    return out


def decode(tokenizer, ids: list[int], eot_id: int | None = None) -> str:
    """Text of ids, cut at the first end-of-text token."""
    if eot_id is not None and eot_id in ids:
        ids = ids[: ids.index(eot_id)]
    return tokenizer.decode(ids, errors="replace")


def main(argv: list[str] | None = None) -> int:
    """`python -m train.sample --ckpt RUN_OR_CHECKPOINT --prompt TEXT`: the demo's fallback sampler
    (eval.sample is the full one: batches, top-p, int8 and ONNX backends, streaming)."""
    import argparse
    import sys

    from data.tokenizer import get_tokenizer
    from model.errors import UserError
    from model.io import load_model

    ap = argparse.ArgumentParser(prog="python -m train.sample", description=main.__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="run directory, checkpoint or model artifact")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)
    if args.temperature < 0:
        ap.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        ap.error(f"--top-k must be >= 0 (0 = all tokens), got {args.top_k}")
    try:
        model, meta = load_model(args.ckpt)
        if not meta.get("tokenizer"):  # an artifact written without one (e.g. by hand)
            raise UserError("its metadata names no tokenizer; use eval.sample --tokenizer SPEC")
        tok = get_tokenizer(meta["tokenizer"], sha256=meta.get("tokenizer_sha256"))
    except UserError as e:
        print(f"error: cannot sample from {args.ckpt}: {e}", file=sys.stderr)
        return 2
    ids = generate(
        model,
        tok.encode(args.prompt, allowed_special="all"),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=args.seed,
    )
    print(args.prompt + decode(tok, ids, meta.get("eot_id")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
