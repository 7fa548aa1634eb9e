"""python -m eval.bench: inference speed and sizes, printed (docs/benchmarks.md's numbers come from here).

    python -m eval.bench                                  # demo model and gpt2, every backend
    python -m eval.bench --models demo --batch-sizes 1    # a quick look
    python -m eval.bench --ckpt runs/debug --models ckpt --data datasets/pydoc-bytes   # + the int8 loss goal

For each model and backend: decode tokens/s (greedy, --new-tokens after a --prompt-len prompt, at
each batch size), prefill tokens/s (a --prefill-len prompt, at the first batch size), and the file
sizes; then the goals:
  KV-cache decode >= 10x the no-cache loop (nanoGPT's generate re-runs the whole context per token),
  ONNX Runtime decode >= 1.5x torch eager fp32, int8 decode >= 2x fp32 on gpt2,
  int8 Linear weights >= 3.5x smaller, int8 val loss within 1% (with --models ckpt --data).
--device cuda runs the torch backends (torch, bf16, compile, nocache) on the GPU; int8 and ONNX are
CPU backends here. The no-cache loop is timed on --nocache-steps steps spread evenly over the same context lengths and
extrapolated to --new-tokens steps (its cost grows with the context; running all of them on gpt2 takes
minutes). Every figure is the fastest of --repeats rounds that each visit every backend once.
Last, weight streaming: batch-1 decode reads every weight once per token, so its tokens/s times the
weight bytes is the memory bandwidth it streams at; printed beside the bandwidth each speed goal
needs, and beside the time of the fp32 step's matrix-vector products alone (timed in the same rounds:
the step's floor on this machine in these minutes) and the step time the KV-cache goal needs.
Models with random weights are fine for speed. This prints numbers; no test times anything.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.machine import describe_cpu
from eval.backends import Backend, OnnxBackend, TorchBackend
from eval.cli import UsageError, run
from model import GPT, ModelConfig

ALL_BACKENDS = ("torch", "bf16", "int8", "onnx", "onnx-int8", "nocache", "compile")
DEFAULT_BACKENDS = ALL_BACKENDS[:-1]  # compile: minutes of inductor time on a small CPU, and slower here
CUDA_BACKENDS = ("torch", "bf16", "nocache", "compile")  # int8 kernels and ONNX Runtime run on the CPU here
DEMO = dict(vocab_size=257, block_size=512, n_layer=4, n_head=4, n_embd=256)


def build_model(name: str, ckpt: str | None) -> tuple[GPT, dict]:
    if name == "ckpt":
        if not ckpt:
            raise UsageError("--models ckpt needs --ckpt")
        from model.io import load_model

        model, meta = load_model(ckpt)
        if meta.get("quantization"):
            raise UsageError(f"{ckpt} is quantized; bench a float checkpoint (int8 is one of the backends)")
        return model.float().eval(), meta
    torch.manual_seed(0)
    if name == "demo":
        return GPT(ModelConfig(**DEMO)).eval(), {"tokenizer": "bytes"}
    if name == "gpt2":
        return GPT(ModelConfig.from_preset("gpt2")).eval(), {"tokenizer": "gpt2"}
    raise UsageError(f"unknown model {name!r}; choose demo, gpt2 or ckpt")


def dir_size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def sync() -> None:
    """Wait for queued CUDA kernels, so that a timer sees their time (a no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_decode(backend: Backend, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 one-token steps), greedy."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, backend.vocab_size, (batch, prompt_len), generator=g)
    pad = torch.zeros(batch, dtype=torch.long)
    sync()
    t0 = time.perf_counter()
    logits = backend.prefill(prompt, pad, prompt_len + new_tokens)  # (B, V)
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = backend.decode(logits.argmax(-1, keepdim=True))  # (B, 1) -> (B, V)
    sync()
    return t1 - t0, time.perf_counter() - t1


def time_nocache(model: GPT, prompt_len: int, new_tokens: int, steps: int) -> float:
    """Estimated seconds for new_tokens greedy steps of the no-cache loop at batch 1."""
    device = next(model.parameters()).device
    x = torch.randint(0, model.config.vocab_size, (1, prompt_len + new_tokens)).to(device)
    lengths = torch.linspace(prompt_len, prompt_len + new_tokens - 1, min(steps, new_tokens)).round().long().tolist()

    def step(n: int) -> torch.Tensor:  # like nanoGPT's forward at inference: the head on the last position only
        h = model.trunk(x[:, :n], torch.arange(n, device=device))  # (1, n, C)
        return model.head(h[:, -1:])[:, -1].argmax(-1)

    with torch.inference_mode():
        step(prompt_len)  # warm-up
        sync()
        t0 = time.perf_counter()
        for n in lengths:
            step(n)
        sync()
        spent = time.perf_counter() - t0
    return spent / len(lengths) * new_tokens


def time_matvecs(model: GPT, batch: int, steps: int) -> float:
    """Seconds per token of the matrix-vector products of a decode step alone: every Linear of `model`
    (the head included) once, in the model's order, on its own weights (as the backend laid them out),
    for `steps` steps at `batch` rows, with nothing between them. A step that reads every weight once
    per token cannot be faster than this on this machine, in these minutes; the rest of a step is
    attention, norms, cache writes and Python."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    p = linears[0].weight
    xs = [torch.randn(batch, 1, m.in_features, device=p.device, dtype=p.dtype) for m in linears]  # (B, 1, in)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            for m, x in zip(linears, xs, strict=True):
                torch.nn.functional.linear(x, m.weight, m.bias)
        sync()
        return (time.perf_counter() - t0) / (steps * batch)


def bench_model(name: str, args, tmp: Path) -> dict:
    model, meta = build_model(name, args.ckpt)
    cfg = model.config
    need = max(args.prompt_len + args.new_tokens, args.prefill_len + 1)
    if need > cfg.block_size:
        raise UsageError(
            f"{name}: prompt + new tokens ({need}) exceed the context of {cfg.block_size}; "
            "lower --new-tokens / --prefill-len"
        )
    print(
        f"\n## {name}: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}, "
        f"{model.num_params() / 1e6:.1f}M params",
        flush=True,
    )
    res: dict = {"rows": [], "sizes": {}}
    from model.io import save_artifact
    from model.quantize import linear_weight_bytes, quantize_model, save_quantized

    save_artifact(tmp / f"{name}-fp32", model, cfg, meta)
    res["sizes"]["artifact fp32"] = dir_size(tmp / f"{name}-fp32")
    backends: dict[str, Backend] = {}
    for b in args.backends:  # each backend gets its own copy: TorchBackend re-lays fp32 weights for decoding
        if b == "torch":
            backends[b] = TorchBackend(copy.deepcopy(model).to(args.device), meta, "torch fp32")
        elif b == "compile":
            backends[b] = TorchBackend(copy.deepcopy(model).to(args.device), meta, "torch compile", compile=True)
        elif b == "bf16":
            backends[b] = TorchBackend(copy.deepcopy(model).to(args.device, torch.bfloat16), meta, "torch bf16")
        elif b == "int8":
            q = quantize_model(copy.deepcopy(model))
            save_quantized(tmp / f"{name}-int8", q, meta)
            res["sizes"]["artifact int8"] = dir_size(tmp / f"{name}-int8")
            res["linear_ratio"] = linear_weight_bytes(model) / linear_weight_bytes(q)
            backends[b] = TorchBackend(q, meta, "int8")
            kernels = sorted({(m.kernel, m.prefill_kernel) for m in q.modules() if hasattr(m, "prefill_kernel")})
            res["int8_kernel"] = ", ".join(f"{d}/{p}" for d, p in kernels)  # decode/prefill, as tuned
            print(f"int8 kernels tuned at load (decode/prefill): {res['int8_kernel']}", flush=True)
            if args.data and name == "ckpt":  # the accuracy goal needs trained weights and their data
                from eval.export import check_batches, val_agreement

                batches = check_batches(args.data, model, None, 8, args.loss_batches)
                res["int8_loss"] = val_agreement(model, q, batches)[1:]  # (fp32 loss, int8 loss)
        elif b in ("onnx", "onnx-int8") and "onnx" not in res:
            from model.onnx_export import check_parity, export_decoder, quantize_onnx

            t0 = time.perf_counter()
            dec = export_decoder(model, tmp / f"{name}-decoder.onnx", meta)
            diff = check_parity(model, None, dec)
            print(
                f"exported the ONNX decoder in {time.perf_counter() - t0:.0f}s "
                f"(max |onnxruntime - torch| = {diff:.1e})",
                flush=True,
            )
            res["onnx"] = dec
            res["sizes"]["onnx fp32"] = dir_size(dec)
    if "onnx" in res:
        if "onnx" in args.backends:
            backends["onnx"] = OnnxBackend(res["onnx"], args.threads)
        if "onnx-int8" in args.backends:
            q8 = quantize_onnx(res["onnx"], tmp / f"{name}-decoder.int8.onnx")
            res["sizes"]["onnx int8"] = dir_size(q8)
            backends["onnx-int8"] = OnnxBackend(q8, args.threads)

    # Every measurement is repeated in rounds, each round visiting every backend once: a slow spell of a
    # shared CPU then hits all backends alike, and the fastest of the rounds is reported (timeit's rule).
    # The ratios the goals compare are taken from the same rounds.
    def decode_timer(be: Backend, B: int):  # -> () -> seconds per decoded token
        return lambda: time_decode(be, B, args.prompt_len, args.new_tokens)[1] / (B * (args.new_tokens - 1))

    def prefill_timer(be: Backend, B: int):  # -> () -> seconds per prompt token
        return lambda: time_decode(be, B, args.prefill_len, 2)[0] / (B * args.prefill_len)

    timers = {}  # (key, batch, "decode" | "prefill") -> timer
    for key, be in backends.items():
        for B in args.batch_sizes:
            time_decode(be, B, args.prompt_len, 8)  # warm-up: first-call allocations, graph setup, compile
            timers[key, B, "decode"] = decode_timer(be, B)
        # prefill once per backend, at the first batch size: a long prompt is already a big matmul
        timers[key, args.batch_sizes[0], "prefill"] = prefill_timer(be, args.batch_sizes[0])
    if "torch" in backends:  # the fp32 step's floor, in the same rounds as the step itself
        fp32 = backends["torch"].model
        timers["matvec", 1, "decode"] = lambda: time_matvecs(fp32, 1, args.new_tokens - 1)
    if "nocache" in args.backends:
        nocache_model = model.to(args.device)  # the last use of the CPU master copy
        timers["nocache", 1, "decode"] = lambda: (
            time_nocache(nocache_model, args.prompt_len, args.new_tokens, args.nocache_steps) / args.new_tokens
        )
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(args.repeats):
        for k, timer in timers.items():
            best[k] = min(best[k], timer())
    for key, be in backends.items():
        for B in args.batch_sizes:
            row = {"backend": be.name, "key": key, "batch": B, "decode": 1 / best[key, B, "decode"]}
            if (key, B, "prefill") in best:
                row["prefill"] = 1 / best[key, B, "prefill"]
            res["rows"].append(row)
            pre = f"   prefill {row['prefill']:9.1f} tok/s" if "prefill" in row else ""
            print(f"  {be.name:<13} batch {B:<3} decode {row['decode']:9.1f} tok/s{pre}", flush=True)
    if "nocache" in args.backends:
        res["nocache"] = 1 / best["nocache", 1, "decode"]
        print(
            f"  {'no-cache':<13} batch 1   decode {res['nocache']:9.1f} tok/s   (nanoGPT-style loop, fp32)", flush=True
        )
    if "torch" in backends:
        res["matvec"] = best["matvec", 1, "decode"]
    res["weight_bytes"] = linear_weight_bytes(model)  # what batch-1 decode reads per token (the head included)
    return res


def report(name: str, res: dict) -> None:
    def rate(key: str, B: int = 1) -> float | None:
        return next((r["decode"] for r in res["rows"] if r["key"] == key and r["batch"] == B), None)

    print(f"\n### {name}: sizes")
    for k, v in res["sizes"].items():
        print(f"  {k:<15} {v / 2**20:9.1f} MiB")
    print(f"### {name}: goals")

    def goal(text: str, value: float | None, target: float) -> None:
        if value is None:
            return
        print(f"  [{'ok' if value >= target else 'MISSED'}] {text}: {value:.2f}x (goal >= {target}x)")

    fp32, base = rate("torch"), res.get("nocache")
    goal("KV-cache decode vs no-cache loop, torch fp32, batch 1", fp32 / base if fp32 and base else None, 10)
    best = max((r for r in res["rows"] if r["batch"] == 1), key=lambda r: r["decode"], default=None)
    if best is not None and base and best["key"] != "torch":
        goal(
            f"KV-cache decode vs no-cache loop, fastest backend ({best['backend']}), batch 1", best["decode"] / base, 10
        )
    for B in sorted({r["batch"] for r in res["rows"]}):
        f, o, i = rate("torch", B), rate("onnx", B), rate("int8", B)
        goal(f"ONNX Runtime fp32 decode vs torch eager fp32, batch {B}", o / f if o and f else None, 1.5)
        if name == "gpt2":
            goal(f"int8 decode vs fp32, batch {B} (kernels {res.get('int8_kernel')})", i / f if i and f else None, 2)
        goal(f"int8 never slower than fp32: decode, batch {B}", i / f if i and f else None, 1)
    f, i = (
        next((r.get("prefill") for r in res["rows"] if r["key"] == k and "prefill" in r), None)
        for k in ("torch", "int8")
    )
    goal("int8 never slower than fp32: prefill", i / f if i and f else None, 1)
    goal("int8 Linear weights smaller than fp32", res.get("linear_ratio"), 3.5)
    if "int8_loss" in res:
        ref, got = res["int8_loss"]
        rel = abs(got - ref) / ref
        print(
            f"  [{'ok' if rel <= 0.01 else 'MISSED'}] int8 val loss {got:.4f} vs fp32 {ref:.4f}: "
            f"{rel:+.2%} (goal within 1%)"
        )
    if fp32:
        # Batch-1 decode reads every weight once per token, so tokens/s x weight bytes is the memory
        # bandwidth it streams at (Williams et al. 2009, "Roofline"), and no backend streams faster than
        # the machine can; the no-cache loop is compute-bound. The goals, restated as bandwidth:
        size = res["weight_bytes"]
        print(f"### {name}: weight streaming at batch 1 ({size / 2**20:.1f} MiB of fp32 weights per token)")
        for key in ("torch", "onnx"):
            if rate(key):
                print(f"  {key} fp32 decode streams at {rate(key) * size / 1e9:.1f} GB/s")
        if "matvec" in res:
            mv, step = res["matvec"], 1 / fp32
            print(
                f"  the step's matrix-vector products alone: {mv * 1e3:.3f} ms/token ({size / mv / 1e9:.1f} GB/s); "
                f"the whole torch fp32 step {step * 1e3:.3f} ms, the rest (attention, norms, cache, Python) "
                f"{(step - mv) * 1e3:.3f} ms"
            )
        if base:
            print(f"  KV-cache >= 10x the no-cache loop needs fp32 decode at {10 * base * size / 1e9:.1f} GB/s")
            print(f"  that is a step of at most {1e3 / (10 * base):.3f} ms (a no-cache step: {1e3 / base:.2f} ms)")
        if rate("onnx"):
            print(f"  ONNX Runtime >= 1.5x torch eager needs onnx at {1.5 * fp32 * size / 1e9:.1f} GB/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--models", default="demo,gpt2", help="comma list of demo, gpt2, ckpt")
    p.add_argument("--ckpt", help="checkpoint benched as model 'ckpt'")
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma list of {', '.join(ALL_BACKENDS)} (default: all but compile; on cuda: {', '.join(CUDA_BACKENDS)})",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda (the torch backends on the GPU)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--nocache-steps", type=int, default=16, help="no-cache steps actually timed")
    p.add_argument("--data", help="with --models ckpt: its dataset, for the int8 val-loss goal")
    p.add_argument("--loss-batches", type=int, default=16, help="val batches (of 8 windows) for that goal")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds over all backends; each figure is the fastest of its rounds"
    )
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: all cores)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda; got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here; use --device cpu")
    default = CUDA_BACKENDS[:-1] if args.device == "cuda" else DEFAULT_BACKENDS
    args.backends = [b for b in (args.backends or ",".join(default)).split(",") if b]
    bad = [b for b in args.backends if b not in ALL_BACKENDS]
    if bad:
        raise UsageError(f"unknown backend(s) {bad}; choose from {', '.join(ALL_BACKENDS)}")
    cpu_only = [b for b in args.backends if b not in CUDA_BACKENDS]
    if args.device == "cuda" and cpu_only:
        raise UsageError(f"--device cuda runs {', '.join(CUDA_BACKENDS)}; {', '.join(cpu_only)} run on the CPU only")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        raise UsageError(f"--batch-sizes must be a comma list of integers, got {args.batch_sizes!r}") from None
    if (
        args.new_tokens < 2
        or args.prompt_len < 1
        or args.prefill_len < 1
        or args.repeats < 1
        or min(args.batch_sizes, default=0) < 1
    ):
        raise UsageError("--new-tokens must be >= 2, --prompt-len, --prefill-len, --repeats and batch sizes >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(
        f"# eval.bench: torch {torch.__version__}{gpu}, {torch.get_num_threads()} threads, {describe_cpu()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; greedy decode of {args.new_tokens} tokens "
        f"after a {args.prompt_len}-token prompt; prefill of {args.prefill_len} tokens"
    )
    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    try:
        results = {m: bench_model(m, args, tmp) for m in args.models}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for m, res in results.items():
        report(m, res)


if __name__ == "__main__":
    sys.exit(run(main))
