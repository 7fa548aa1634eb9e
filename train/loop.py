"""The training loop: one file, the same for one CPU core, one GPU and N ranks of any parallel layout.

The loop knows nothing about parallelism: it calls the Strategy seam (train/strategy.py) only, and
hands checkpoints to train/checkpoint.py. Per step, in order (Trainer.train):
    batches = loader.next_step()                      # this rank's grad_accum micro-batches
    train_step: apply_schedule(step), forward/backward each micro-batch (autocast), clip, optimizer step
    meter.add: running loss and a device-side "non-finite seen" step marker (no host sync)
    maybe_log     at log steps: sync, check the marker, print / write metrics
    maybe_eval    at eval steps: val loss (loss_totals + all_reduce_sum)
    maybe_hellaswag  at eval.hellaswag_every steps: HellaSwag acc / acc_norm (train/hellaswag.py)
    maybe_sample  at sample steps: a text sample
    maybe_stop    SIGTERM / SIGINT on any rank
    maybe_save    every N, best val, last, stop: an atomic checkpoint

Exact resume: every RNG the step draws from is saved and restored, the loader's state is its position
in the global token stream, the schedule is a function of the step, and evaluation and sampling run
under a forked RNG with their own generator, so they never move the training stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model import GPT
from model.dtypes import short, torch_dtype
from model.loss import loss_totals
from model.moe import after_step, routing_health
from train import hellaswag
from train.callbacks import EvalCallback, TrainPruned
from train.checkpoint import CheckpointManager, TrainState, checkpoint_name, find_resume
from train.config import Config
from train.dataset import build_model, build_model_config, read_dataset_meta
from train.device import autocast_ctx, cpu_has_fast_bf16, pick_device, resolve_dtype
from train.errors import TrainError
from train.faults import kill_point
from train.fp8 import peak_dtype as fp8_peak_dtype
from train.guard import SpikeGuard, inject
from train.metrics import MetricsWriter, device_peak_flops, format_line, peak_memory_gb, truncate_metrics
from train.optim import apply_schedule, build_optimizer
from train.parallel.build import make_strategy
from train.parallel.dims import DIMS, ParallelDims, check_model
from train.parallel.world import env_world
from train.plan import preflight_check
from train.sample import decode, generate
from train.signals import StopFlag
from train.strategy import Strategy, StrategySpec
from train.watchdog import Watchdog, maybe_hang, write_heartbeat

# ----------------------------------------------------------------------------- set-up helpers


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def train_step(
    strategy: Strategy,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    amp: contextlib.AbstractContextManager,
    after_backward=None,
    gate=None,
    after_step=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches (each x, y: (micro_batch, seq_len) int64).
    Returns (mean loss over the micro-batches, pre-clip grad norm) as device scalars: no host sync.
    after_backward(): called before the step (the spike tests' hook); gate(loss, norm) -> False skips
    the optimizer step (train/guard.py); after_step(): called after the optimizer step (fp8's weight
    scales, train/fp8.py)."""
    loss = strategy.forward_backward(micro_batches, amp)
    if after_backward is not None:
        after_backward()
    norm = strategy.clip_and_step() if gate is None else strategy.clip_and_step(gate=lambda n: gate(loss, n))
    if after_step is not None:
        after_step()
    strategy.zero_grad()
    return loss, norm


class StepMeter:
    """What the steps between two log lines leave behind, kept on the device so that no step waits for
    the host: the summed loss, and the first step whose loss (or grad norm) was not finite. Also the
    wall time of those steps, less what evaluation, sampling and saving took (`paused`)."""

    def __init__(self, device: torch.device, step: int, check_norm: bool):
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.step = torch.full((), step, dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.check_norm = check_norm  # the fp16 scaler skips overflowed steps by design
        self.steps, self.start, self.excluded = 0, time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, norm: torch.Tensor, skipped: bool = False) -> None:
        self.step += 1
        if skipped:  # train/guard.py skipped its update: logged there, not averaged here
            return
        finite = torch.isfinite(loss) & torch.isfinite(norm) if self.check_norm else torch.isfinite(loss)
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, self.step, self.bad_step)
        self.loss_sum += loss.float()
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - t0

    def take(self) -> tuple[torch.Tensor, int, float]:
        """(mean loss tensor, steps, seconds) since the last take; starts the next interval."""
        out = (self.loss_sum / self.steps, self.steps, max(time.perf_counter() - self.start - self.excluded, 1e-9))
        self.loss_sum = torch.zeros_like(self.loss_sum)
        self.steps, self.start, self.excluded = 0, time.perf_counter(), 0.0
        return out


# ----------------------------------------------------------------------------- the run


def run(cfg: Config, *, log=print, callbacks: Sequence[EvalCallback] = ()) -> dict:
    """Train as configured. Returns {"step", "val_loss", "best_val", "stopped": done|signal name}.
    Raises TrainError (or data's DataError) for anything the user can fix or must know, TrainPruned
    when a callback stopped the run (train/callbacks.py)."""
    rank, local_rank, world_size = env_world()
    dims = mesh_dims(cfg, rank, world_size)
    device = pick_device(cfg.train.device, local_rank)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)  # one GPU per rank, as the strategy's process group has it
    if device.type == "cuda":
        torch.cuda.set_device(device)  # default-device allocations and the CUDA RNG are this GPU's
    if cfg.train.dtype == "auto":  # resolved once, here: the printed and saved config says what ran
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype=resolve_dtype(device)))
    if cfg.train.dtype == "float16" and device.type != "cuda":
        raise TrainError(f"train.dtype=float16 needs CUDA (loss scaling); use bfloat16 or float32 on {device.type}")
    if cfg.train.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError("this GPU has no bfloat16 support; use train.dtype=float16")

    # Data and model first: their user errors are the same on every rank, before any process group.
    # The loader's rank and world are the data-parallel ones: the ranks of one tp / cp / pp group read the
    # same windows; each data-parallel rank, and each cp and pp rank within it, draws its own dropout masks.
    data = Data.open(cfg, dims.dp_rank, dims.dp_size, device)
    set_seeds(cfg.train.seed + dims.rng_rank)  # reproducible; resumes restore each rank's RNG state
    mcfg, init_weights = build_model_config(cfg, data.meta)
    check_model(dims, mcfg, cfg.seq_len)
    preflight_check(cfg, mcfg, world_size, device)  # CUDA: stop a layout the planner says cannot fit
    model = build_model(cfg, mcfg, init_weights)
    loader = data.train_loader(mcfg.vocab_size)
    spec = StrategySpec(
        precision=short(cfg.train.dtype),
        grad_accum_steps=loader.grad_accum_steps,
        grad_clip=cfg.optim.grad_clip,
        compile=cfg.train.compile,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    try:
        strategy = make_strategy(cfg.parallel.strategy, device, spec, **cfg.parallel_options())
    except (ValueError, ImportError) as e:
        if isinstance(e, TrainError):
            raise
        raise TrainError(f"parallel.strategy={cfg.parallel.strategy}: {e}") from None
    try:
        trainer = Trainer(cfg, strategy, data, loader, model, log)
        trainer.callbacks = list(callbacks)
        return trainer.train()
    finally:
        strategy.teardown()


def mesh_dims(cfg: Config, rank: int, world_size: int) -> ParallelDims:
    """The degrees of this launch (a MeshError, before any process group, when they do not fit it)."""
    options = cfg.parallel_options()
    if world_size > 1 and cfg.parallel.strategy == "none" and all(options.get(d, 1) == 1 for d in DIMS):
        raise TrainError(
            f"WORLD_SIZE={world_size} (torchrun) but parallel.strategy=none: set "
            "parallel.strategy=ddp (or fsdp / deepspeed, or the mesh degrees), or start a single process"
        )
    return ParallelDims.from_options(cfg.parallel.strategy, options, world_size, rank)


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """This rank's bytes of parameters and of optimizer state (a DTensor counts its local shard). The
    optimizer's state appears at its first step: before that, AdamW's two moments and Muon's momentum
    are counted at the parameters' size."""

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(local(p) for p in {id(p): p for p in model.parameters()}.values())
    optim = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if state:
                optim += sum(local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            else:
                optim += (1 if group.get("name") == "muon" else 2) * local(p)
    return params, optim


@dataclasses.dataclass
class Data:
    """The prepared dataset this rank reads: its meta.json, its tokenizer, and where its batches go."""

    cfg: Config
    meta: dict
    tokenizer: object
    rank: int
    world_size: int
    device: torch.device
    hellaswag_examples: list[dict] = dataclasses.field(default_factory=list)  # eval.hellaswag_data's, when on
    mix: tuple = ()  # data.mix: (sources, weight phases) from data.mixture.parse_mix; () for data.dir

    @classmethod
    def open(cls, cfg: Config, rank: int, world_size: int, device: torch.device) -> Data:
        from data.tokenizer import get_tokenizer

        mix = ()
        if cfg.data.mix:
            from data.mixture import mix_meta, parse_mix

            mix = parse_mix(cfg.data.mix, cfg.data.mix_schedule)
            for s in mix[0]:
                read_dataset_meta(s.dir)  # a missing directory: the same advice as for data.dir
            meta = mix_meta(mix[0])
        else:
            meta = read_dataset_meta(cfg.data.dir)
        tokenizer = get_tokenizer(meta["tokenizer"], sha256=meta.get("tokenizer_sha256"))
        examples = hellaswag.load(cfg) if cfg.eval.hellaswag_every > 0 else []
        return cls(cfg, meta, tokenizer, rank, world_size, device, examples, mix)

    @property
    def label(self) -> str:
        """What the run trains on, for the log and the artifact's metadata."""
        if not self.mix:
            return str(self.cfg.data.dir)
        return "mix " + ", ".join(f"{s.name}={s.weight:g} ({s.dir})" for s in self.mix[0])

    def train_loader(self, vocab_size: int):
        layout = dict(
            seq_len=self.cfg.seq_len,
            tokens_per_step=self.cfg.train.tokens_per_step,
            micro_batch=self.cfg.train.micro_batch,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.cfg.train.seed,
            device=self.device,
            vocab_size=vocab_size,
        )
        if self.mix:
            from data.mixture import MixtureLoader

            return MixtureLoader(*self.mix, **layout)
        from data.loader import BatchLoader

        return BatchLoader(self.cfg.data.dir, **layout)

    def val_sets(self, vocab_size: int) -> list[tuple[str | None, float, object]]:
        """(name, weight, val batches) per val set: one unnamed for data.dir, one per source of data.mix."""
        from data.loader import val_batches

        dirs = [(s.name, s.weight, s.dir) for s in self.mix[0]] if self.mix else [(None, 1.0, self.cfg.data.dir)]
        kwargs = dict(
            seq_len=self.cfg.seq_len,
            batch_size=self.cfg.train.micro_batch,
            max_batches=self.cfg.train.eval_batches,
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            vocab_size=vocab_size,
        )
        return [(name, weight, val_batches(d, **kwargs)) for name, weight, d in dirs]


class Trainer:
    """One run: set-up in __init__ (which describes the run), the loop in train(), one short method per
    thing a step may do. The state that a checkpoint saves is self.state (a TrainState), nothing else."""

    def __init__(self, cfg: Config, strategy: Strategy, data: Data, loader, model: GPT, log) -> None:
        self.cfg, self.strategy, self.data, self.loader = cfg, strategy, data, loader
        self._log, self.bar = log, None
        self.callbacks: list[EvalCallback] = []  # train/callbacks.py: told of each evaluation, may stop the run
        self.run_dir = Path(cfg.train.run_dir)
        self.mcfg = model.config
        self.flops_per_token = model.flops_per_token(cfg.seq_len)
        n_params = model.num_params()
        self.active_params = model.num_params(active=True)  # a mixture of experts runs k of E experts
        if strategy.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (nanoGPT does too)
            torch.backends.cudnn.allow_tf32 = True
        self.fp8_layers, self.after_step = self.convert_fp8(model)
        self.model, self.optimizer = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
        self.amp = autocast_ctx(strategy.device, cfg.train.dtype)
        self.ckpts = CheckpointManager(
            self.run_dir, strategy, self.mcfg, cfg.checkpoint.keep_last, asynchronous=cfg.checkpoint.async_save
        )
        self.guard = SpikeGuard(cfg.guard) if cfg.guard.enabled else None
        if self.guard is not None and strategy.name == "deepspeed":
            raise TrainError(
                "guard.enabled=true needs a torch-native layout (none / ddp / fsdp / the mesh degrees): "
                "DeepSpeed's engine steps inside engine.step(); set guard.enabled=false"
            )
        self.state, resumed_from = self.resume_or_start()
        self.peak_flops, peak_source = device_peak_flops(strategy.device, fp8_peak_dtype(cfg.train))
        if cfg.train.fp8 != "none" and cfg.train.fp8_emulate:
            peak_source += f"; fp8 emulated in {cfg.train.dtype}, so not the fp8 peak"
        logging = cfg.logging
        self.metrics = MetricsWriter(
            self.run_dir,
            strategy.is_main,
            logging.tensorboard,
            logging.wandb,
            logging.wandb_project,
            logging.wandb_run_name,
            cfg.to_dict(),
        )
        self.describe(n_params, peak_source, resumed_from)

    def log(self, msg: str) -> None:
        if self.strategy.is_main:
            (self.bar.write if self.bar is not None and not self.bar.disable else self._log)(msg)

    # ------------------------------------------------------------------ set-up
    def convert_fp8(self, model: GPT) -> tuple[int, object]:
        """train.fp8: the bare model's Linear layers to torchao's Float8Linear, before the layout's
        transforms (train/fp8.py). Returns (layers converted, the after-step hook or None)."""
        t = self.cfg.train
        if t.fp8 == "none":
            return 0, None
        from train import fp8

        fp8.check_device(self.strategy.device, t.fp8_emulate)
        dims = getattr(self.strategy, "dims", None)
        return fp8.convert(model, t.fp8, t.fp8_emulate, fsdp=dims is not None and dims.uses_fsdp)

    def resume_or_start(self) -> tuple[TrainState, Path | None]:
        cfg, strategy = self.cfg, self.strategy
        resume_from = find_resume(self.run_dir, cfg.train.resume)
        if strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.train.resume == "never" and self.ckpts.root.exists():
                self.log(f"train.resume=never: removing the previous checkpoints in {self.run_dir}")
                self.ckpts.remove_all()
            self.ckpts.clean_stale()
        strategy.barrier()
        if resume_from is None:
            state = TrainState(world_size=strategy.world_size, strategy=strategy.name, model_config=self.mcfg.to_dict())
        else:
            state = self.ckpts.load(resume_from)  # model, optimizer, this rank's RNG
            self.loader.load_state_dict(state.loader)
            if self.guard is not None:
                self.guard.load_state_dict(state.guard)
        if strategy.is_main:
            if resume_from is not None:
                truncate_metrics(self.run_dir, state.step)
            else:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        return state, resume_from

    def describe(self, n_params: int, peak_source: str, resumed_from: Path | None) -> None:
        cfg, strategy, meta, device = self.cfg, self.strategy, self.data.meta, self.strategy.device
        self.log("resolved config:\n" + "\n".join("  " + line for line in cfg.to_yaml().splitlines()))
        self.log(
            f"run dir {self.run_dir} | device {device} x {strategy.world_size} | strategy {cfg.parallel.strategy} "
            f"| dtype {cfg.train.dtype} | compile {cfg.train.compile}"
        )
        if self.fp8_layers:
            emulated = " (emulated by torchao in high precision)" if cfg.train.fp8_emulate else ""
            self.log(
                f"fp8 {cfg.train.fp8}: {self.fp8_layers} Linear layers run in float8{emulated}; the head and "
                f"layers whose dims are not multiples of 16 stay in {cfg.train.dtype}"
                + (" | fp8 FSDP all-gather" if self.after_step is not None else "")
            )
        self.log(
            f"model {n_params / 1e6:.2f}M params"
            + (f" ({self.active_params / 1e6:.2f}M active)" if self.active_params != n_params else "")
            + f" ({self.mcfg.family}, {self.mcfg.n_layer} layers, "
            f"{self.mcfg.n_embd} wide) | data {self.data.label} (tokenizer {meta['tokenizer']}, "
            f"vocab {meta['vocab_size']}, {meta['train_tokens']:,} train tokens)"
        )
        self.log(
            f"batch {cfg.train.tokens_per_step:,} tokens/step = {self.data.world_size} data-parallel rank(s) x "
            f"{strategy.spec.grad_accum_steps} accumulation x {cfg.train.micro_batch} x {cfg.seq_len} | "
            f"{self.flops_per_token / 1e6:.1f} MFLOPs/token | peak {self.peak_flops / 1e12:.3g} TFLOP/s "
            f"({peak_source})"
        )
        if device.type == "cpu" and cfg.train.dtype == "bfloat16" and not cpu_has_fast_bf16():
            self.log(
                "note: this CPU has no bf16 matrix instructions (AVX512-BF16 / AMX): bf16 matmuls are "
                "emulated and several times slower than float32 here; consider train.dtype=float32"
            )
        layout = strategy.layout()
        params, optim = local_state_bytes(self.model, self.optimizer)
        coords = layout.get("coords", {})
        self.log(
            f"mesh {' x '.join(f'{d} {layout[d]}' for d in coords) or layout['strategy']} | rank {strategy.rank} at "
            f"({', '.join(f'{d} {i}' for d, i in coords.items()) or '-'}) | per rank: parameters "
            f"{params / 2**20:.1f} MiB, optimizer state {optim / 2**20:.1f} MiB"
        )
        self.metrics.write({"step": self.state.step, "mesh": layout})
        restart, requeue = (int(os.environ.get(k) or 0) for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
        if restart or requeue:  # launch.sh --max-restarts (torchrun), the sbatch script's requeue (SLURM)
            self.metrics.write(
                {
                    "step": self.state.step,
                    "restart": restart,
                    "requeue": requeue,
                    "resumed_from": resumed_from.name if resumed_from is not None else None,
                }
            )
            self.log(
                f"restart {restart} of at most {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')} (torchrun), "
                f"requeue {requeue} (SLURM): "
                + (f"resumed from {resumed_from.name}" if resumed_from is not None else "no checkpoint yet: step 0")
            )
        if resumed_from is not None:
            self.log(f"resumed from {resumed_from} at step {self.state.step}")
        elif cfg.train.init_from:
            self.log(f"initialised from {cfg.train.init_from} (fresh optimizer and schedule)")

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        from tqdm import tqdm

        cfg, state = self.cfg, self.state
        max_steps = cfg.train.max_steps
        if state.step >= max_steps:
            self.log(
                f"nothing to do: the run is at step {state.step} >= train.max_steps={max_steps} "
                "(raise train.max_steps to continue, or train.resume=never to start over)"
            )
            return self.finish("done", quiet=True)
        if state.step == 0 and cfg.train.eval_every > 0:  # the untrained baseline (nanoGPT evaluates at 0)
            self.evaluate_and_record()
        if state.step == 0:
            self.maybe_hellaswag(last=False)
        self.bar = tqdm(
            total=max_steps,
            initial=state.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.strategy.is_main and cfg.logging.progress_bar and sys.stderr.isatty()),
        )
        self.meter = StepMeter(self.strategy.device, state.step, check_norm=cfg.train.dtype != "float16")
        self.heartbeat()
        watchdog = Watchdog(
            self.run_dir, self.strategy.rank, self.strategy.world_size, cfg.train.step_timeout_s, self.log
        )
        profiler = self.make_profiler()
        stopped = "done"
        with StopFlag() as stop, profiler, watchdog, self.ckpts.finally_wait():
            while state.step < max_steps:
                batches = self.loader.next_step()
                lr = self.set_lr(state.step)
                loss, norm = train_step(
                    self.strategy, batches, self.amp, *self.step_hooks(state.step + 1), after_step=self.after_step
                )
                skipped = self.guard is not None and self.guard.last.skip
                if not skipped:
                    after_step(self.model)  # MoE: the routing biases follow this step's load (model/moe.py)
                state.step += 1
                state.tokens = state.step * cfg.train.tokens_per_step
                self.meter.add(loss, norm, skipped)
                watchdog.beat(state.step)
                if skipped:
                    self.guard.report_skip(state.step, self.metrics, self.log)
                    if self.guard.wants_rollback():
                        self.rollback()
                        continue
                self.bar.update(1)
                if cfg.logging.profile_steps > 0:
                    profiler.step()
                last = state.step == max_steps
                self.maybe_log(lr, norm, last)
                with self.meter.paused():
                    improved = self.maybe_eval(last)
                    self.maybe_hellaswag(last)
                    self.maybe_sample(last)
                    stopping = self.maybe_stop(stop, last)
                    self.maybe_save(improved, last, stopping)
                watchdog.beat()  # evaluation, sampling and saving count as progress too
                if stopping:
                    stopped = signal.Signals(stop.signum).name if stop.signum else "signal on another rank"
                    self.log(
                        f"stopped by {stopped} at step {state.step}; checkpoint "
                        f"{checkpoint_name(state.step)} saved. Run the same command to resume."
                    )
                    break
        self.bar.close()
        return self.finish(stopped)

    def step_hooks(self, step: int) -> tuple:
        """(after_backward, gate) for train_step at training step `step` (1-based)."""
        guard, rank = self.guard, self.strategy.rank
        data_step = guard.data_step(step) if guard is not None else step
        hook = lambda: self.fault_hooks(rank, step, data_step)  # noqa: E731
        gate = (lambda loss, norm: guard.admit(self.strategy, step, loss, norm)) if guard is not None else None
        return hook, gate

    def fault_hooks(self, rank: int, step: int, data_step: int) -> None:
        """The test-only faults, after the backward: a corrupted gradient (train/guard.py), a rank asleep
        before a collective (train/watchdog.py), a rank killed (train/faults.py); each a no-op unless
        its environment variable asks."""
        inject(self.model, rank, data_step)
        maybe_hang(rank, step, lambda: self.strategy.all_reduce_sum(torch.zeros(1, device=self.strategy.device)))
        kill_point(step, rank)

    def rollback(self) -> None:
        """train/guard.py's rollback; the loop restarts its meter and bar at the step it went back to."""
        self.guard.roll_back(self.state, self.ckpts, self.loader, self.metrics, self.log)
        self.meter = StepMeter(self.strategy.device, self.state.step, check_norm=self.meter.check_norm)
        self.bar.n = self.state.step

    def heartbeat(self) -> None:
        if self.strategy.is_main:  # train/watchdog.py: what an outside scheduler reads
            write_heartbeat(self.run_dir, self.state.step, self.strategy.world_size, self.cfg.train.max_steps)

    def set_lr(self, step: int) -> float:
        cfg = self.cfg
        return apply_schedule(self.optimizer, step, cfg.optim, cfg.schedule, cfg.train.max_steps)

    def maybe_log(self, lr: float, norm: torch.Tensor, last: bool) -> None:
        cfg, strategy, step = self.cfg, self.strategy, self.state.step
        if not (step % cfg.logging.log_every == 0 or last):
            return
        self.stop_if_nonfinite()
        if self.meter.steps == 0:  # every step since the last line was skipped (train/guard.py logged each)
            return
        mean_loss, steps, seconds = self.meter.take()
        tokens_per_s = cfg.train.tokens_per_step * steps / seconds
        record = {
            "step": step,
            "loss": (strategy.all_reduce_sum(mean_loss) / strategy.world_size).item(),
            "lr": lr,
            "grad_norm": norm.item(),
            "tokens": self.state.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * strategy.world_size),
            "ms_per_step": 1000 * seconds / steps,
            "peak_mem_gb": peak_memory_gb(strategy.device),
            **routing_health(self.model),  # MoE: each block's expert shares, aux losses, bias range
        }
        self.metrics.write(record)
        self.heartbeat()
        self.log(format_line(record, cfg.train.max_steps))
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)

    def maybe_eval(self, last: bool) -> bool:
        """Evaluate at eval steps; True when the val loss is the best so far."""
        every = self.cfg.train.eval_every
        if not (every > 0 and (self.state.step % every == 0 or last)):
            return False
        self.stop_if_nonfinite()
        improved = self.evaluate_and_record()
        if self.callbacks:  # every rank agrees (one all-reduce), so that all of them stop together
            asks = [cb.after_eval(self.state.step, self.state.val_loss) for cb in self.callbacks]
            if self.strategy.any_flag(any(asks)):
                raise TrainPruned(self.state.step)
        return improved

    def evaluate_and_record(self) -> bool:
        state = self.state
        state.val_loss = self.evaluate()
        improved = state.step > 0 and (state.best_val is None or state.val_loss < state.best_val)
        if improved:
            state.best_val, state.best_step = state.val_loss, state.step
        parts = getattr(self, "val_parts", {})  # data.mix: each source's val loss, and its windows drawn so far
        mix_stats = {
            f"data/{name}/{k}": v
            for name, stats in getattr(self.loader, "source_stats", dict)().items()
            for k, v in stats.items()
        }
        self.metrics.write({"step": state.step, "val_loss": state.val_loss, **parts, **mix_stats})
        detail = "".join(f" | {k} {v:.4f}" for k, v in parts.items())
        if state.step == 0:
            self.log(f"step 0 | val loss {state.val_loss:.4f}{detail}")
        else:
            self.log(
                f"step {state.step} | val loss {state.val_loss:.4f}"
                + (" (best)" if improved else f" (best {state.best_val:.4f} at {state.best_step})")
                + detail
            )
        if mix_stats:
            self.log(
                "data: "
                + ", ".join(
                    f"{n} {s['windows']:,} windows (epoch {s['epoch']})" for n, s in self.loader.source_stats().items()
                )
            )
        return improved

    def maybe_hellaswag(self, last: bool) -> None:
        """HellaSwag at eval.hellaswag_every steps (and step 0, and the last): console, metrics, and the
        next checkpoint's artifact metadata (kept in the TrainState, so a resumed run still has it)."""
        every, step = self.cfg.eval.hellaswag_every, self.state.step
        if not (every > 0 and (step % every == 0 or last)):
            return
        if step > 0:  # no step has run at 0 (nor made the meter)
            self.stop_if_nonfinite()
        with self.fork_rng():
            counts = hellaswag.evaluate(
                self.strategy.eval_model(),
                self.data.tokenizer,
                self.data.hellaswag_examples,
                self.strategy,
                self.cfg,
                self.mcfg.block_size,
            )
        result = hellaswag.record(counts)
        self.metrics.write({"step": step, **result})
        self.state.artifact_metadata.update(result, hellaswag_step=step)
        self.log(hellaswag.line(step, counts))

    def maybe_sample(self, last: bool) -> None:
        every = self.cfg.logging.sample_every
        if not (every > 0 and (self.state.step % every == 0 or last)):
            return
        text = self.sample(self.strategy.sample_decoder())
        self.metrics.write({"step": self.state.step, "sample": text})
        self.metrics.text("sample", text, self.state.step)
        self.log(f"---- sample at step {self.state.step} ----\n{text}\n----")

    def maybe_stop(self, stop: StopFlag, last: bool) -> bool:
        """True on every rank when any rank got SIGTERM / SIGINT. One flag check per step alone (no
        sync); across ranks at log steps only, since the all-reduce is a host sync (a cluster's grace
        period is far longer than log_every steps)."""
        strategy = self.strategy
        if strategy.world_size > 1 and not (self.state.step % self.cfg.logging.log_every == 0 or last):
            return False
        return strategy.any_flag(stop.signum is not None)

    def maybe_save(self, improved: bool, last: bool, stopping: bool) -> None:
        rules, step = self.cfg.checkpoint, self.state.step
        best = improved and rules.keep_best
        final = stopping or (last and rules.save_final)
        if final or best or (rules.every > 0 and step % rules.every == 0):
            self.save(is_best=best, final=final)

    # ------------------------------------------------------------------ pieces
    def save(self, is_best: bool, final: bool) -> Path:
        self.stop_if_nonfinite()  # never write a non-finite state
        self.state.loader = self.loader.state_dict()
        self.state.config = self.cfg.to_dict()
        self.state.guard = self.guard.state_dict() if self.guard is not None else {}
        self.state.artifact_metadata = {
            "tokenizer": self.data.meta["tokenizer"],
            "tokenizer_sha256": self.data.meta.get("tokenizer_sha256"),
            "eot_id": self.data.meta.get("eot_id"),
            "step": self.state.step,
            "val_loss": self.state.val_loss,
            **{k: v for k, v in self.state.artifact_metadata.items() if k.startswith("hellaswag_")},
            "dataset": self.data.label,
        }
        path = self.ckpts.save(self.state, is_best=is_best, with_model=is_best or final)
        done = "writing checkpoint {} in the background" if self.ckpts.asynchronous else "saved checkpoint {}"
        self.log(done.format(path) + (" (best)" if is_best else ""))
        return path

    def evaluate(self) -> float:
        """Mean val loss over eval_batches per rank, summed over ranks before dividing. Under data.mix,
        each source's val split separately (self.val_parts: val/<name>) and their mean weighted by the
        data.mix weights (fixed for the run, so that val losses of different steps compare)."""
        dtype = self.cfg.train.dtype
        losses = []
        for name, weight, batches in self.data.val_sets(self.mcfg.vocab_size):
            with self.fork_rng():
                total, count = loss_totals(
                    self.strategy.eval_model(),
                    batches,
                    autocast_dtype=None if dtype == "float32" else torch_dtype(dtype),
                )
            total, count = self.strategy.all_reduce_sum(total), self.strategy.all_reduce_sum(count)
            losses.append((name, weight, (total / count).item()))
        self.val_parts = {f"val/{name}": loss for name, _, loss in losses if name is not None}
        return sum(w * loss for _, w, loss in losses) / sum(w for _, w, _ in losses)

    def sample(self, decoder) -> str:
        """The log's text sample, in the run's precision (under its autocast, as evaluation): modules
        that FSDP's mixed precision does not cast, such as expert-parallel experts, meet bf16 rows."""
        opts, tokenizer = self.cfg.logging, self.data.tokenizer
        prompt = tokenizer.encode(opts.sample_prompt, allowed_special="all")
        with self.fork_rng(), self.amp:
            ids = generate(
                decoder,
                prompt,
                opts.sample_tokens,
                temperature=opts.sample_temperature,
                top_k=opts.sample_top_k,
                seed=self.cfg.train.seed,
            )
        return opts.sample_prompt + decode(tokenizer, ids, self.data.meta.get("eot_id"))

    def fork_rng(self) -> contextlib.AbstractContextManager:
        """Belt and braces on top of eval mode and sample()'s own generator: whatever runs inside
        leaves the training RNG (CPU and this GPU) exactly where it was."""
        device = self.strategy.device
        return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])

    def stop_if_nonfinite(self) -> None:
        """Raise, naming the step, if any rank saw a non-finite loss or grad norm (one host sync)."""
        bad = int(self.meter.bad_step.item())
        if not self.strategy.any_flag(bad >= 0):
            return
        where = f"at step {bad}" if bad >= 0 else "on another rank"
        last_good = self.ckpts.latest()
        raise TrainError(
            f"non-finite loss or gradient {where}: stopping without saving that state. "
            + (f"The last good checkpoint is {last_good}; " if last_good else "")
            + "lower optim.lr, raise schedule.warmup_steps, keep optim.grad_clip > 0, or use bfloat16 "
            "instead of float16"
        )

    def finish(self, stopped: str, quiet: bool = False) -> dict:
        self.metrics.close()
        state = self.state
        if stopped == "done" and not quiet:
            best = f" | best val {state.best_val:.4f} at step {state.best_step}" if state.best_val is not None else ""
            val = f" | val loss {state.val_loss:.4f}" if state.val_loss is not None else ""
            self.log(f"done: {state.step} steps{val}{best} | run dir {self.run_dir}")
        return {"step": state.step, "val_loss": state.val_loss, "best_val": state.best_val, "stopped": stopped}

    def make_profiler(self):
        """torch.profiler over logging.profile_steps steps after 1 skipped and 2 warm-up steps; the trace
        (RUN/profile/trace_rank0.json) opens in chrome://tracing or Perfetto."""
        n = self.cfg.logging.profile_steps
        if n <= 0:
            return contextlib.nullcontext()
        from torch.profiler import ProfilerActivity, profile, schedule

        out = self.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"trace_rank{self.strategy.rank}.json"

        def on_ready(prof) -> None:
            prof.export_chrome_trace(str(path))
            self.log(
                f"profiler trace written to {path}\n"
                + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            )

        cuda = self.strategy.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        return profile(
            activities=activities,
            schedule=schedule(wait=1, warmup=2, active=n, repeat=1),
            on_trace_ready=on_ready,
            record_shapes=True,
        )
