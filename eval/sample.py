"""python -m eval.sample: text from a checkpoint (or an exported ONNX decoder), streamed token by token.

    python -m eval.sample --ckpt runs/debug --prompt "def main(" --max-new-tokens 200
    python -m eval.sample --ckpt runs/debug --backend int8 --top-p 0.9 --seed 1
    python -m eval.sample --backend onnx --onnx export/decoder.onnx --prompt-file prompt.txt
    echo "Once upon a time" | python -m eval.sample --ckpt runs/debug --temperature 0

The tokenizer is the one named in the checkpoint's metadata (or the ONNX file's metadata_props).
Several --prompt flags are generated as one left-padded batch and printed when all are done.
"""

from __future__ import annotations

import argparse
import sys

from eval.backends import BACKENDS, DTYPES, Backend, load_backend
from eval.cli import UsageError, dtype_flag, run
from eval.generate import TextStream, check_sampling, generate
from eval.stops import StopWriter, stop_rules

EOT = "<|endoftext|>"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.sample",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--ckpt", help="run directory, checkpoint or model artifact (torch and int8 backends)")
    p.add_argument("--backend", default="torch", help=f"one of {', '.join(BACKENDS)} (default torch)")
    p.add_argument("--onnx", help="decoder .onnx file, or the directory eval.export wrote (onnx backend)")
    p.add_argument("--dtype", default="fp32", help=f"torch backend precision: {' or '.join(DTYPES)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch and int8 backends)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--tokenizer", help="override the tokenizer spec of the checkpoint's metadata")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of prompts")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--crop-prompt", action="store_true", help="keep the end of a prompt longer than the context")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (Holtzman et al. 2019)")
    p.add_argument("--seed", type=int, default=1337, help="same seed + backend = same text")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop", action="append", help=f"stop at this text or special token (default {EOT})")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompt texts, or None for an unconditional sample (starts from <|endoftext|>)."""
    if args.prompt and args.prompt_file:
        raise UsageError("give --prompt or --prompt-file, not both")
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return [f.read()]
        except OSError as e:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    if args.prompt:
        return args.prompt
    if not sys.stdin.isatty():
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise UsageError("the prompt on standard input is not UTF-8 text") from None
        return [text] if text else None
    return None


def encode_prompt(enc, text: str | None, block_size: int, crop: bool) -> list[int]:
    if text is None:
        return [enc.eot_token]
    ids = enc.encode(text, allowed_special="all")  # a literal <|endoftext|> in a prompt is the token
    if not ids:
        raise UsageError("the prompt is empty; give some text or leave the prompt out for an unconditional sample")
    if len(ids) > block_size:
        if not crop:
            raise UsageError(
                f"the prompt is {len(ids)} tokens but the model's context is {block_size}; "
                "shorten it, or pass --crop-prompt to keep its end"
            )
        ids = ids[-block_size:]  # generation past the context crops again as it goes (eval.generate)
    return ids


def get_encoding(spec: str | None, where: str):
    if not spec:
        raise UsageError(f"{where} names no tokenizer in its metadata; pass --tokenizer SPEC (e.g. bytes, gpt2)")
    from data.tokenizer import get_tokenizer

    return get_tokenizer(spec)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    top_k = args.top_k or None
    check_sampling(args.temperature, top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    backend: Backend = load_backend(
        args.backend, args.ckpt, args.onnx, dtype_flag(args.dtype), args.compile, args.device
    )
    enc = get_encoding(args.tokenizer or backend.tokenizer, args.ckpt or args.onnx)
    if enc.n_vocab > backend.vocab_size:
        raise UsageError(f"tokenizer {enc.name!r} has {enc.n_vocab} tokens but the model only {backend.vocab_size}")
    texts = read_prompts(args)
    prompts = [encode_prompt(enc, t, backend.block_size, args.crop_prompt) for t in (texts or [None])]
    max_new = args.max_new_tokens  # past the context, eval.generate keeps the recent half and goes on
    stop_ids, stop_texts = stop_rules(enc, args.stop if args.stop is not None else [EOT])
    common = dict(temperature=args.temperature, top_k=top_k, top_p=args.top_p, stop_ids=stop_ids)
    out = sys.stdout

    def write(s: str) -> None:
        out.write(s)
        out.flush()

    if len(prompts) == 1:  # streamed, one sample after the other
        for i in range(args.num_samples):
            if i:
                write("\n\n---------------\n\n")
            if not args.no_echo and texts:
                write(texts[0])
            stream, writer = TextStream(enc), StopWriter(stop_texts, write)
            generate(
                backend,
                prompts,
                max_new,
                seed=args.seed + i,
                on_token=lambda _b, tok, w=writer, s=stream: w.feed(s.push(tok)),
                **common,
            )
            writer.feed(stream.flush())
            writer.close()
        write("\n")
        return
    rows = [p for p in prompts for _ in range(args.num_samples)]  # a batch: printed when all are done
    outs = generate(backend, rows, max_new, seed=args.seed, **common)
    for r, new in enumerate(outs):
        pieces: list[str] = []
        writer = StopWriter(stop_texts, pieces.append)
        writer.feed(enc.decode(new, errors="replace"))
        writer.close()
        prefix = "" if args.no_echo else texts[r // args.num_samples]
        write(
            f"=== prompt {r // args.num_samples + 1}, sample {r % args.num_samples + 1} ===\n"
            f"{prefix}{''.join(pieces)}\n"
        )


if __name__ == "__main__":
    sys.exit(run(main))
