"""python -m eval.harness: lm-evaluation-harness tasks on a checkpoint, through our engine.

    python -m eval.harness --ckpt runs/gpt2 --tasks hellaswag,arc_easy --limit 200
    python -m eval.harness --ckpt runs/gpt2 --tasks my_task --include-path my_tasks/ --no-builtin-tasks
    python -m eval.harness --ckpt runs/gpt2 --tasks lambada_openai --output results.json
    torchrun --nproc_per_node=8 -m eval.harness --ckpt runs/gpt2 --tasks hellaswag --device cuda

Prints lm-eval's results table; --output writes its results as JSON. Under torchrun lm-eval gives every
rank its share of the requests and gathers the results on rank 0, which prints them. The model class
is also usable from lm-eval's own Python API (importing this module registers it as "gptrain"):

    import lm_eval, eval.harness
    lm_eval.simple_evaluate(model="gptrain", model_args="ckpt=runs/gpt2,batch_size=32", tasks=["hellaswag"])

Needs the optional extra: pip install -e '.[eval]' (lm-eval >= 0.4).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from eval.backends import DTYPES, TorchBackend, load_backend
from eval.cli import UsageError, run
from eval.generate import TextStream, generate
from model.scoring import score

INSTALL = "lm-evaluation-harness is not installed; pip install -e '.[eval]' (or pip install 'lm-eval>=0.4')"

try:
    import lm_eval
    import lm_eval.models  # noqa: F401  lm-eval registers its own models (hf, ...) only while its registry is

    # empty, which it is not once ours is registered
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the optional `eval` extra: the CLI says how to install it
    lm_eval = None
    TemplateLM = object

    def register_model(*names):
        return lambda cls: cls


@register_model("gptrain")
class GPTrainLM(TemplateLM):
    """lm-eval's model interface on one of our checkpoints: loglikelihood (batched, padded, masked to the
    continuation: model/scoring.py), loglikelihood_rolling (lm-eval's disjoint windows of the model's
    context), generate_until (the KV-cache loop of model/generation.py, left-padded batches). Text is
    tokenized with the checkpoint's own tokenizer; contexts too long for the model lose tokens from the left.

    Arguments (also as lm-eval's model_args string): ckpt (a run directory, checkpoint or artifact),
    batch_size (rows per forward pass), device, dtype (fp32 / bf16), max_gen_toks (default 256, as lm-eval's
    `hf` model; a task's generation_kwargs override it).
    """

    def __init__(
        self,
        ckpt: str | None = None,
        batch_size: int | str | None = 16,
        device: str | None = "cpu",
        dtype: str = "fp32",
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; batch sizes are fixed here
        backend: TorchBackend | None = None,
    ):
        if lm_eval is None:
            raise UsageError(INSTALL)
        super().__init__()
        from data.tokenizer import get_tokenizer

        if backend is None:
            if ckpt is None:
                raise UsageError("the gptrain model needs ckpt=PATH (a run directory, checkpoint or artifact)")
            backend = load_backend("torch", str(ckpt), dtype=dtype, device=device or "cpu")
        if not backend.tokenizer:
            raise UsageError(f"{ckpt} records no tokenizer in its metadata; lm-eval tasks are text")
        self.backend_ = backend
        self.enc = get_tokenizer(backend.tokenizer)
        if self.enc.n_vocab > backend.vocab_size:
            raise UsageError(
                f"tokenizer {backend.tokenizer!r} has {self.enc.n_vocab} tokens, the model only {backend.vocab_size}"
            )
        if batch_size is None:
            batch_size = 16
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise UsageError(f"batch_size must be a number of rows (got {batch_size!r}; 'auto' is not supported)")
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self._batch_size}")
        self._max_gen_toks = int(max_gen_toks)
        self._device = backend.device
        if dist.is_available() and dist.is_initialized():  # under torchrun: lm-eval splits the requests by rank
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # ---------------------------------------------------------------- what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.enc.eot_token

    @property
    def max_length(self) -> int:
        return self.backend_.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.backend_.tokenizer

    # lm-eval's evaluator calls these only when world_size > 1 (one process group, set up by the caller)
    def all_gather(self, tensor):
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj, dst=0):
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self):
        dist.barrier()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Special-token text (<|endoftext|>) becomes the special token, as Hugging Face tokenizers do.
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            tokens = [t for t in tokens if t != self.eot_token_id]
        return self.enc.decode(list(tokens))

    # ---------------------------------------------------------------- the three request types
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens) as TemplateLM encodes them."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        scores = score(self.backend_.model, pairs, self.max_length, batch_size=self.batch_size, device=self.device)
        cut = sum(s.truncated for s in scores)
        if cut:
            print(
                f"note: {cut} of {len(scores)} requests were longer than the model's context of {self.max_length} "
                "tokens and lost tokens from the left",
                file=sys.stderr,
            )
        return [(-s.loss, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text: disjoint windows of the model's context, the first one
        conditioned on <|endoftext|> (lm-eval's get_rolling_token_windows with context_len 1)."""
        pairs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        scores = score(self.backend_.model, pairs, self.max_length, batch_size=self.batch_size, device=self.device)
        for i, s in zip(owner, scores, strict=True):
            totals[i] -= s.loss
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks for do_sample) continuations, cut at the first stop string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one batch shape per set of generation settings, as lm-eval's hf
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.enc.decode([self.eot_token_id])
            if eos not in until:
                until.append(eos)
            n_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            keep = self.max_length - n_new
            if keep < 1:
                raise UsageError(
                    f"a task asks for {n_new} new tokens, but the model's context is {self.max_length}; "
                    "lower the task's max_gen_toks"
                )
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                texts = self._generate(
                    [prompts[i] for i in batch], n_new, until, temperature, kwargs.get("top_k"), kwargs.get("top_p")
                )
                for i, text in zip(batch, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    def _generate(self, prompts, n_new, until, temperature, top_k, top_p) -> list[str]:
        streams = [TextStream(self.enc) for _ in prompts]
        texts = [""] * len(prompts)

        def on_token(row: int, token: int) -> bool:  # a row is done once its text holds a stop string
            texts[row] += streams[row].push(token)
            return any(s and s in texts[row] for s in until)

        tokens = generate(
            self.backend_, prompts, n_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=0, on_token=on_token
        )
        results = []
        for toks in tokens:
            text = self.tok_decode(toks, skip_special_tokens=False)
            for s in until:  # lm-eval cuts at every stop string in turn: the earliest one wins
                if s:
                    text = text.split(s)[0]
            results.append(text)
        return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.harness",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint or model artifact")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or YAML paths)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass / prompts per generation batch")
    p.add_argument("--dtype", default="fp32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--include-path", default=None, help="a folder of extra task YAML files")
    p.add_argument(
        "--no-builtin-tasks",
        action="store_true",
        help="only the tasks under --include-path (skips indexing lm-eval's built-in task files)",
    )
    p.add_argument("--output", default=None, help="write lm-eval's results here as JSON")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random / numpy / torch / few-shot seeds")
    return p.parse_args(argv)


def task_manager(include_path: str | None, builtin: bool):
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path} is not a directory of task YAML files")
    if not builtin and include_path is None:
        raise UsageError("--no-builtin-tasks needs --include-path DIR (where the tasks are)")
    return TaskManager(include_path=include_path, include_defaults=builtin)


def check_tasks(tm, names: list[str]) -> None:
    """A UsageError carrying lm-eval's own message for the first name it does not know."""
    for name in names:
        if Path(name).is_file() or tm.match_tasks([name]):
            continue
        load = getattr(tm, "load", None)  # lm-eval >= 0.4.10; before, lm_eval.tasks.get_task_dict
        try:
            load([name]) if load is not None else lm_eval.tasks.get_task_dict([name], tm)
        except (KeyError, ValueError) as e:
            raise UsageError(f"lm-eval: {e.args[0] if e.args else e}") from None
        raise UsageError(f"lm-eval knows no task {name!r}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if lm_eval is None:
        raise UsageError(INSTALL)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {args.dtype!r}; choose one of {', '.join(DTYPES)}")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UsageError("--tasks is empty; name at least one lm-eval task")
    tm = task_manager(args.include_path, not args.no_builtin_tasks)
    check_tasks(tm, names)
    if args.output and not Path(args.output).parent.is_dir():
        raise UsageError(f"--output {args.output}: the folder {Path(args.output).parent} does not exist")
    from eval.hellaswag import init_distributed

    rank, world, device = init_distributed(args.device)
    try:
        evaluate(args, names, tm, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def evaluate(args: argparse.Namespace, names: list[str], tm, device: str) -> None:
    lm = GPTrainLM(ckpt=args.ckpt, batch_size=args.batch_size, device=device, dtype=args.dtype)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=False,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
            fewshot_random_seed=args.seed,
        )
    except ConnectionError as e:  # datasets: offline, and a task's dataset is not in the cache
        raise UsageError(
            f"a task's dataset cannot be downloaded ({str(e)[:200]}); run once online to fill the Hugging Face "
            "cache, or define the task over local files (dataset_path: json) with --include-path"
        ) from None
    if results is None:  # ranks other than 0: their results went to rank 0
        return
    print(lm_eval.utils.make_table(results))
    if args.output:
        from model.files import write_text_atomic

        doc = {k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better") if k in results}
        doc["model"] = {"ckpt": str(args.ckpt), "tokenizer": lm.tokenizer_name, "dtype": args.dtype}
        write_text_atomic(args.output, json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(run(main))
