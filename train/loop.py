"""The training loop: one file, the same for one CPU core, one GPU and N ranks of DDP / FSDP / DeepSpeed.

The loop knows nothing about parallelism: it calls the Strategy seam (train/strategy.py) only.
Per step, in order:
    batches = loader.next_step()                      # this rank's grad_accum micro-batches
    set lr = lr_at(step)                              # a pure function of the step
    forward/backward each micro-batch (autocast), clip, optimizer step, zero_grad
    track loss and a device-side "non-finite seen" step marker   (no host sync)
    at log steps: sync, check the marker, print / write metrics
    at eval steps: val loss (loss_totals + all_reduce_sum), at sample steps: a text sample
    at checkpoint steps (every N, best val, last, SIGTERM/SIGINT): an atomic checkpoint

Exact resume: every RNG the step draws from is saved and restored, the loader's state is its position
in the global token stream, the schedule is a function of the step, and evaluation and sampling run
under a forked RNG with their own generator, so they never move the training stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model import GPT, ModelConfig
from model.io import ArtifactError, load_state, read_config, resolve
from model.loss import loss_totals
from train.checkpoint import CheckpointManager, checkpoint_name, find_resume, load_rank_rng, rng_state, set_rng_state
from train.config import Config
from train.errors import TrainError
from train.metrics import MetricsWriter, device_peak_flops, format_line, peak_memory_gb, truncate_metrics
from train.optim import build_optimizer, lr_at
from train.sample import decode, generate
from train.strategy import Strategy, env_world, make_strategy, unwrap

PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # Strategy.precision names


# ----------------------------------------------------------------------------- set-up helpers


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU when CUDA is present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"train.device={spec} but CUDA is not available here; use train.device=cpu (or auto)")
    if spec == "mps" and not torch.backends.mps.is_available():
        raise TrainError("train.device=mps but MPS is not available here; use train.device=cpu (or auto)")
    return torch.device("cuda", local_rank) if spec == "cuda" else torch.device(spec)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here; without them torch falls back to slow reference ones."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False  # unknown: assume the common case (no bf16 units)


def resolve_dtype(device: torch.device) -> str:
    """train.dtype=auto: the fastest precision this device trains in without surprises."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def autocast_ctx(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast (weights and optimizer stay fp32), or nothing for fp32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def read_dataset_meta(data_dir: str) -> dict:
    from data.shards import read_meta

    path = Path(data_dir)
    if not path.is_dir():
        raise TrainError(
            f"data.dir={data_dir} does not exist: prepare it first, e.g. "
            f"`python -m data.prepare --source pydoc --tokenizer bytes --out {data_dir}`"
        )
    return read_meta(path)


def build_model_config(cfg: Config, meta: dict) -> tuple[ModelConfig, dict | None]:
    """The ModelConfig to train, and the init_from state dict if any. Under init_from the architecture
    comes from the artifact (its weights fix it) and only dropout from the config, as nanoGPT does."""
    if cfg.train.init_from:
        try:
            icfg, state, imeta = load_state(cfg.train.init_from)
        except ArtifactError as e:
            raise TrainError(f"train.init_from: {e}") from None
        tok = imeta.get("tokenizer")
        if tok is not None and tok != meta["tokenizer"]:
            raise TrainError(
                f"train.init_from={cfg.train.init_from} was trained with tokenizer {tok!r} but "
                f"data.dir={cfg.data.dir} holds {meta['tokenizer']!r} tokens; prepare the data "
                f"with --tokenizer {tok}"
            )
        if icfg.vocab_size < meta["vocab_size"]:
            raise TrainError(f"train.init_from has vocab_size {icfg.vocab_size} < the dataset's {meta['vocab_size']}")
        mcfg = dataclasses.replace(icfg, dropout=cfg.model.dropout)
        if cfg.seq_len > mcfg.block_size:
            raise TrainError(
                f"data.seq_len {cfg.seq_len} exceeds init_from's block_size {mcfg.block_size}; "
                f"set data.seq_len <= {mcfg.block_size}"
            )
        return mcfg, state
    fields = dataclasses.asdict(cfg.model)
    vocab = fields["vocab_size"] or meta["vocab_size"]
    if vocab < meta["vocab_size"]:
        raise TrainError(
            f"model.vocab_size {vocab} is smaller than the dataset's vocab_size {meta['vocab_size']} "
            f"(tokenizer {meta['tokenizer']!r}); set model.vocab_size=null to take the dataset's"
        )
    return ModelConfig(**{**fields, "vocab_size": vocab}), None


def check_resume_compatible(ckpt: Path, mcfg: ModelConfig) -> None:
    """A clear message, instead of a size-mismatch traceback, when the run dir holds another model."""
    try:
        saved, _ = read_config(resolve(ckpt))
    except ArtifactError:
        return  # a sharded layout this check cannot read; the strategy's load will tell
    a, b = saved.to_dict(), mcfg.to_dict()
    diff = {k: (a[k], b[k]) for k in a if k != "dropout" and a.get(k) != b.get(k)}
    if diff:
        raise TrainError(
            f"cannot resume from {ckpt}: its model differs from the config "
            f"({', '.join(f'{k}: {x} -> {y}' for k, (x, y) in diff.items())}); "
            "use another train.run_dir, or train.resume=never to start over"
        )


class StopFlag:
    """SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint at the end of the
    current step and exit cleanly; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
            "exiting (Ctrl-C again to abort now)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application): no handler
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_step(
    model: nn.Module,
    strategy: Strategy,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    amp: contextlib.AbstractContextManager,
    grad_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches (each x, y: (micro_batch, seq_len) int64).
    Returns (mean loss over the micro-batches, pre-clip grad norm) as device scalars: no host sync."""
    n = len(micro_batches)
    loss_sum = None
    for i, (x, y) in enumerate(micro_batches):
        with strategy.sync_context(is_last=i == n - 1):  # DDP all-reduces only on the last micro-batch
            with amp:
                loss = model(x, y)  # mean cross entropy of this micro-batch
            strategy.backward(loss)  # scales by 1/n: the accumulated gradient is the mean
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    norm = strategy.clip_and_step(grad_clip)
    strategy.zero_grad()
    return loss_sum / n, norm


# ----------------------------------------------------------------------------- the run


def run(cfg: Config, *, log=print) -> dict:
    """Train as configured. Returns {"step", "val_loss", "best_val", "stopped": done|signal name}.
    Raises TrainError (or data's DataError) for anything the user can fix or must know."""
    rank, local_rank, world_size = env_world()
    if world_size > 1 and cfg.parallel.strategy == "none":
        raise TrainError(
            f"WORLD_SIZE={world_size} (torchrun) but parallel.strategy=none: set "
            "parallel.strategy=ddp (or fsdp / deepspeed), or start a single process"
        )
    device = pick_device(cfg.train.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # default-device allocations and the CUDA RNG are this GPU's
    if cfg.train.dtype == "auto":  # resolved once, here: the printed and saved config says what ran
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype=resolve_dtype(device)))
    if cfg.train.dtype == "float16" and device.type != "cuda":
        raise TrainError(f"train.dtype=float16 needs CUDA (loss scaling); use bfloat16 or float32 on {device.type}")
    if cfg.train.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError("this GPU has no bfloat16 support; use train.dtype=float16")
    try:
        strategy = make_strategy(cfg.parallel.strategy, device, **cfg.parallel_options())
    except (ValueError, ImportError) as e:
        raise TrainError(f"parallel.strategy={cfg.parallel.strategy}: {e}") from None
    except RuntimeError as e:
        if type(e).__name__ == "DistributedSetupError":
            raise TrainError(str(e)) from None
        raise
    try:
        return _Run(cfg, strategy, log).train()
    finally:
        strategy.teardown()


class _Run:
    """The state of one run; train() is the loop. A class only to share set-up with the helpers."""

    def __init__(self, cfg: Config, strategy: Strategy, log) -> None:
        self.cfg, self.s = cfg, strategy
        self.main = strategy.is_main
        self._log = log
        self.device = strategy.device
        self.run_dir = Path(cfg.train.run_dir)
        self.seq_len = cfg.seq_len

    def log(self, msg: str) -> None:
        if self.main:
            (self.bar.write if getattr(self, "bar", None) is not None and not self.bar.disable else self._log)(msg)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        cfg, s = self.cfg, self.s
        from data.loader import BatchLoader
        from data.tokenizer import get_tokenizer

        self.meta = read_dataset_meta(cfg.data.dir)
        self.tokenizer = get_tokenizer(self.meta["tokenizer"], sha256=self.meta.get("tokenizer_sha256"))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (nanoGPT does too)
            torch.backends.cudnn.allow_tf32 = True

        set_seeds(cfg.train.seed + s.rank)  # different dropout masks per rank, reproducible per rank
        self.mcfg, init_state = build_model_config(cfg, self.meta)
        model = GPT(self.mcfg)
        if init_state is not None:
            if self.mcfg.tie_embeddings:
                init_state = {k: v for k, v in init_state.items() if k != "lm_head.weight"}
            missing, unexpected = model.load_state_dict(init_state, strict=False)
            missing = [k for k in missing if not (self.mcfg.tie_embeddings and k == "lm_head.weight")]
            if missing or unexpected:
                raise TrainError(
                    f"train.init_from weights do not fit its own config (missing {missing}, unexpected {unexpected})"
                )
        self.flops_per_token = model.flops_per_token(self.seq_len)
        self.n_params = model.num_params()

        self.loader = BatchLoader(
            cfg.data.dir,
            seq_len=self.seq_len,
            tokens_per_step=cfg.train.tokens_per_step,
            micro_batch=cfg.train.micro_batch,
            rank=s.rank,
            world_size=s.world_size,
            seed=cfg.train.seed,
            device=self.device,
            vocab_size=self.mcfg.vocab_size,
        )
        s.grad_accum_steps = self.loader.grad_accum_steps
        s.grad_clip = cfg.optim.grad_clip
        s.precision = PRECISION[cfg.train.dtype]
        self.model, self.optimizer = s.wrap(model, lambda m: build_optimizer(m, cfg.optim))
        if cfg.train.compile and not s.compiles_model:
            self.model = torch.compile(self.model)
        self.bare = unwrap(self.model)
        self.amp = autocast_ctx(self.device, cfg.train.dtype)

        # ---- resume, or start over
        self.ckpts = CheckpointManager(self.run_dir, s, cfg.checkpoint.keep_last)
        self.step, self.best_val, self.best_step, self.last_val = 0, None, None, None
        resume_from = find_resume(self.run_dir, cfg.train.resume)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.train.resume == "never" and (self.run_dir / "checkpoints").exists():
                self.log(f"train.resume=never: removing the previous checkpoints in {self.run_dir}")
                self.ckpts.remove_all()
            self.ckpts.clean_stale()
        s.barrier()
        if resume_from is not None:
            check_resume_compatible(resume_from, self.mcfg)
            extra = s.load(resume_from)
            self.step = int(extra["step"])
            self.best_val, self.best_step = extra.get("best_val"), extra.get("best_step")
            self.last_val = extra.get("val_loss")
            self.loader.load_state_dict(extra["loader"])
            rng = load_rank_rng(resume_from, s.rank, extra)
            if rng is not None:
                set_rng_state(rng)  # last: nothing below draws from the training RNG
        self.resumed_from = resume_from
        if self.main:
            if resume_from is not None:
                truncate_metrics(self.run_dir, self.step)
            else:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.peak_flops, self.peak_source = device_peak_flops(self.device, cfg.train.dtype)
        self.metrics = MetricsWriter(
            self.run_dir,
            self.main,
            cfg.logging.tensorboard,
            cfg.logging.wandb,
            cfg.logging.wandb_project,
            cfg.logging.wandb_run_name,
            cfg.to_dict(),
        )

    def describe(self) -> None:
        cfg, s = self.cfg, self.s
        self.log("resolved config:\n" + "\n".join("  " + line for line in cfg.to_yaml().splitlines()))
        self.log(
            f"run dir {self.run_dir} | device {self.device} x {s.world_size} | strategy {cfg.parallel.strategy} "
            f"| dtype {cfg.train.dtype} | compile {cfg.train.compile}"
        )
        self.log(
            f"model {self.n_params / 1e6:.2f}M params ({self.mcfg.family}, {self.mcfg.n_layer} layers, "
            f"{self.mcfg.n_embd} wide) | data {cfg.data.dir} (tokenizer {self.meta['tokenizer']}, "
            f"vocab {self.meta['vocab_size']}, {self.meta['train_tokens']:,} train tokens)"
        )
        self.log(
            f"batch {cfg.train.tokens_per_step:,} tokens/step = {s.world_size} rank(s) x "
            f"{self.loader.grad_accum_steps} accumulation x {cfg.train.micro_batch} x {self.seq_len} | "
            f"{self.flops_per_token / 1e6:.1f} MFLOPs/token | peak {self.peak_flops / 1e12:.3g} TFLOP/s "
            f"({self.peak_source})"
        )
        if self.device.type == "cpu" and cfg.train.dtype == "bfloat16" and not cpu_has_fast_bf16():
            self.log(
                "note: this CPU has no bf16 matrix instructions (AVX512-BF16 / AMX): bf16 matmuls are "
                "emulated and several times slower than float32 here; consider train.dtype=float32"
            )
        if self.resumed_from is not None:
            self.log(f"resumed from {self.resumed_from} at step {self.step}")
        elif cfg.train.init_from:
            self.log(f"initialised from {cfg.train.init_from} (fresh optimizer and schedule)")

    # ------------------------------------------------------------------ pieces
    def evaluate(self) -> float:
        """Mean val loss over eval_batches per rank, summed over ranks before dividing."""
        from data.loader import val_batches

        cfg = self.cfg
        batches = val_batches(
            cfg.data.dir,
            seq_len=self.seq_len,
            batch_size=cfg.train.micro_batch,
            max_batches=cfg.train.eval_batches,
            rank=self.s.rank,
            world_size=self.s.world_size,
            device=self.device,
            vocab_size=self.mcfg.vocab_size,
        )
        amp_dtype = None if cfg.train.dtype == "float32" else getattr(torch, cfg.train.dtype)
        with self.fork_rng():
            total, count = loss_totals(self.model, batches, autocast_dtype=amp_dtype)
        total, count = self.s.all_reduce_sum(total), self.s.all_reduce_sum(count)
        return (total / count).item()

    def sample(self) -> str:
        lc = self.cfg.logging
        prompt = self.tokenizer.encode(lc.sample_prompt, allowed_special="all")
        with self.fork_rng():
            ids = generate(
                self.bare,
                prompt,
                lc.sample_tokens,
                temperature=lc.sample_temperature,
                top_k=lc.sample_top_k,
                seed=self.cfg.train.seed,
                device=self.device,
            )
        return lc.sample_prompt + decode(self.tokenizer, ids, self.meta.get("eot_id"))

    def fork_rng(self) -> contextlib.AbstractContextManager:
        """Belt and braces on top of eval mode and sample()'s own generator: whatever runs inside
        leaves the training RNG (CPU and this GPU) exactly where it was."""
        cuda = self.device.type == "cuda"
        return torch.random.fork_rng(devices=[self.device.index or 0] if cuda else [])

    def first_bad_step(self) -> int | None:
        """The step of the first non-finite loss / grad norm on any rank (one host sync)."""
        bad = int(self.bad_step.item())
        if self.s.any_flag(bad >= 0):
            return bad if bad >= 0 else -1
        return None

    def stop_if_nonfinite(self) -> None:
        bad = self.first_bad_step()
        if bad is not None:
            where = f"at step {bad}" if bad >= 0 else "on another rank"
            latest = self.ckpts.root / "latest"
            last = latest.read_text().strip() if latest.is_file() else None
            raise TrainError(
                f"non-finite loss or gradient {where}: stopping without saving that state. "
                + (f"The last good checkpoint is {self.ckpts.root / last}; " if last else "")
                + "lower optim.lr, raise schedule.warmup_steps, keep optim.grad_clip > 0, or use bfloat16 "
                "instead of float16"
            )

    def save(self, is_best: bool) -> Path:
        self.stop_if_nonfinite()  # never write a non-finite state
        extra = {
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": rng_state(),
            "best_val": self.best_val,
            "best_step": self.best_step,
            "val_loss": self.last_val,
            "tokens_seen": self.step * self.cfg.train.tokens_per_step,
            "world_size": self.s.world_size,
            "config": self.cfg.to_dict(),
        }
        metadata = {
            "tokenizer": self.meta["tokenizer"],
            "tokenizer_sha256": self.meta.get("tokenizer_sha256"),
            "eot_id": self.meta.get("eot_id"),
            "step": self.step,
            "val_loss": self.last_val,
            "dataset": str(self.cfg.data.dir),
        }
        path = self.ckpts.save(self.step, extra, metadata, is_best=is_best)
        self.log(f"saved checkpoint {path}" + (" (best)" if is_best else ""))
        return path

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from tqdm import tqdm

        self.setup()
        cfg, s, lc = self.cfg, self.s, self.cfg.logging
        max_steps = cfg.train.max_steps
        self.bar = None
        self.describe()
        if self.step >= max_steps:
            self.log(
                f"nothing to do: the run is at step {self.step} >= train.max_steps={max_steps} "
                "(raise train.max_steps to continue, or train.resume=never to start over)"
            )
            self.metrics.close()
            return {"step": self.step, "val_loss": self.last_val, "best_val": self.best_val, "stopped": "done"}

        if self.step == 0 and cfg.train.eval_every > 0:  # the untrained baseline (nanoGPT evaluates at 0)
            self.last_val = self.evaluate()
            self.metrics.write({"step": 0, "val_loss": self.last_val})
            self.log(f"step 0 | val loss {self.last_val:.4f}")

        self.bar = tqdm(
            total=max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.main and lc.progress_bar and sys.stderr.isatty()),
        )
        # device-side bookkeeping: no .item() between log steps
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        step_t = torch.full((), self.step, dtype=torch.long, device=self.device)
        loss_acc = torch.zeros((), dtype=torch.float32, device=self.device)
        steps_acc, t_last, t_excluded = 0, time.perf_counter(), 0.0
        check_norm = cfg.train.dtype != "float16"  # the fp16 scaler skips overflowed steps by design
        stop_reason = "done"
        profiler = self.make_profiler()
        profiling = cfg.logging.profile_steps > 0

        with StopFlag() as stop, profiler:
            while self.step < max_steps:
                batches = self.loader.next_step()
                lr = lr_at(self.step, cfg.optim.lr, cfg.schedule, max_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, norm = train_step(self.model, s, batches, self.amp, cfg.optim.grad_clip)
                self.step += 1
                step_t += 1
                finite = torch.isfinite(loss) & torch.isfinite(norm) if check_norm else torch.isfinite(loss)
                self.bad_step = torch.where((self.bad_step < 0) & ~finite, step_t, self.bad_step)
                loss_acc += loss.float()
                steps_acc += 1
                self.bar.update(1)
                if profiling:
                    profiler.step()

                last = self.step == max_steps
                if self.step % lc.log_every == 0 or last:
                    self.stop_if_nonfinite()
                    mean_loss = s.all_reduce_sum(loss_acc / steps_acc) / s.world_size
                    elapsed = max(time.perf_counter() - t_last - t_excluded, 1e-9)
                    tps = cfg.train.tokens_per_step * steps_acc / elapsed
                    record = {
                        "step": self.step,
                        "loss": mean_loss.item(),
                        "lr": lr,
                        "grad_norm": norm.item(),
                        "tokens": self.step * cfg.train.tokens_per_step,
                        "tokens_per_s": tps,
                        "mfu": self.flops_per_token * tps / (self.peak_flops * s.world_size),
                        "ms_per_step": 1000 * elapsed / steps_acc,
                        "peak_mem_gb": peak_memory_gb(self.device),
                    }
                    self.metrics.write(record)
                    self.log(format_line(record, max_steps))
                    self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                    loss_acc.zero_()
                    steps_acc, t_last, t_excluded = 0, time.perf_counter(), 0.0

                t0 = time.perf_counter()
                improved = False
                if cfg.train.eval_every > 0 and (self.step % cfg.train.eval_every == 0 or last):
                    self.stop_if_nonfinite()
                    self.last_val = self.evaluate()
                    improved = self.best_val is None or self.last_val < self.best_val
                    if improved:
                        self.best_val, self.best_step = self.last_val, self.step
                    self.metrics.write({"step": self.step, "val_loss": self.last_val})
                    self.log(
                        f"step {self.step} | val loss {self.last_val:.4f}"
                        + (" (best)" if improved else f" (best {self.best_val:.4f} at {self.best_step})")
                    )
                if lc.sample_every > 0 and (self.step % lc.sample_every == 0 or last):
                    text = self.sample()
                    self.metrics.write({"step": self.step, "sample": text})
                    self.metrics.text("sample", text, self.step)
                    self.log(f"---- sample at step {self.step} ----\n{text}\n----")

                # one flag check per step alone (no sync); across ranks at log steps only, since the
                # all-reduce is a host sync (a cluster's grace period is far longer than log_every steps)
                check_stop = s.world_size == 1 or self.step % lc.log_every == 0 or last
                stopping = check_stop and s.any_flag(stop.signum is not None)
                ck = cfg.checkpoint
                if (
                    stopping
                    or (ck.every > 0 and self.step % ck.every == 0)
                    or (last and ck.save_final)
                    or (improved and ck.keep_best)
                ):
                    self.save(is_best=improved and ck.keep_best)
                t_excluded += time.perf_counter() - t0
                if stopping:
                    stop_reason = signal.Signals(stop.signum).name if stop.signum else "signal on another rank"
                    self.log(
                        f"stopped by {stop_reason} at step {self.step}; checkpoint "
                        f"{checkpoint_name(self.step)} saved. Run the same command to resume."
                    )
                    break
        self.bar.close()
        self.metrics.close()
        if stop_reason == "done":
            best = f" | best val {self.best_val:.4f} at step {self.best_step}" if self.best_val is not None else ""
            val = f" | val loss {self.last_val:.4f}" if self.last_val is not None else ""
            self.log(f"done: {self.step} steps{val}{best} | run dir {self.run_dir}")
        return {"step": self.step, "val_loss": self.last_val, "best_val": self.best_val, "stopped": stop_reason}

    def make_profiler(self):
        """torch.profiler over logging.profile_steps steps after 1 skipped and 2 warm-up steps; the trace
        (RUN/profile/trace_rank0.json) opens in chrome://tracing or Perfetto."""
        n = self.cfg.logging.profile_steps
        if n <= 0:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile, schedule

        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"trace_rank{self.s.rank}.json"

        def on_ready(prof) -> None:
            prof.export_chrome_trace(str(path))
            self.log(
                f"profiler trace written to {path}\n"
                + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            )

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        return profile(
            activities=activities,
            schedule=schedule(wait=1, warmup=2, active=n, repeat=1),
            on_trace_ready=on_ready,
            record_shapes=True,
        )
