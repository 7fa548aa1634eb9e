"""The one typed training config: dataclass sections loaded from YAML, overridden from the command line.

    python -m train --config configs/debug.yaml optim.lr=1e-3 train.max_steps=200

Every key is `section.field`; values are parsed as YAML (`1e-3`, `true`, `null`, `[0.9, 0.95]`) and
checked against the field's type. An unknown key or a wrong type raises one ConfigError naming the key
and the closest valid one (difflib), before any work starts. `parallel.deepspeed` is a free-form dict:
`parallel.deepspeed.zero_optimization.stage=3` sets a nested key inside it.

The model section is model.ModelConfig (its fields and their comments live there, once). A section is
built from its keys in one call once every key is read, so that a section's own checks (ModelConfig's
head divisibility, n_kv_head defaulting to n_head) see the final values, whatever order they came in.

This module imports neither torch nor the network (model.config is plain Python), so that a bad key is
reported in a fraction of a second.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from data.hellaswag import HF_NAME, HF_PREFIX
from data.hellaswag import STYLES as HELLASWAG_STYLES
from model.config import ModelConfig
from model.dtypes import CANONICAL
from train.errors import ConfigError
from train.parallel.dims import DIMS, check_async_tp, check_model

TRAIN_DTYPES = ("auto", *CANONICAL)
SCHEDULES = ("cosine", "wsd", "constant")
WSD_SHAPES = ("linear", "1-sqrt")
STRATEGIES = ("none", "ddp", "fsdp", "deepspeed")
OPTIMIZERS = ("adamw", "muon")
FP8_RECIPES = ("none", "tensorwise", "rowwise")  # train/fp8.py (torchao's float8 recipes)
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn
# Strategies that can run Muon: the native mesh (whole matrices, or DTensor shards of FSDP and TP that
# the optimizer gathers for Newton-Schulz: train/optim.py). DeepSpeed's ZeRO flattens them.
MUON_STRATEGIES = ("none", "ddp", "fsdp")
PP_SCHEDULES = ("1F1B", "Interleaved1F1B")
_MUON_REFUSED = {"deepspeed": "ZeRO flattens the parameters into partitioned buffers"}


# Where a training config's default differs from the section class's own: the model is sized to the
# dataset's vocabulary (meta.json) unless model.vocab_size says otherwise.
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {"model": {"vocab_size": None}}


def _model_section() -> ModelConfig:
    return ModelConfig(**_CONFIG_DEFAULTS["model"])


class _Section:
    """A section of the training config. check() tests the section's own values (one ConfigError naming
    `section.field`); checks that read two sections sit in _cross_checks. The key names come from the
    fields: `self._key("lr")` is "optim.lr" in the optim section."""

    def check(self) -> None:
        """The section's own value checks (none by default)."""

    def _key(self, name: str) -> str:
        section = next(s for s, cls in _sections().items() if cls is type(self))
        return f"{section}.{name}"

    def _choose(self, name: str, choices: tuple) -> None:
        _choice(self._key(name), getattr(self, name), choices)

    def _bound(self, op: str, lo: float, *names: str, allow_null: bool = False) -> None:
        """Each named field `op` lo (op: '>' or '>='); allow_null: null passes too."""
        for name in names:
            v = getattr(self, name)
            ok = (v is None and allow_null) or (v is not None and (v > lo if op == ">" else v >= lo))
            _check(ok, f"{self._key(name)} must be {op} {lo}{' or null' if allow_null else ''}; got {v}")


@dataclass
class DataSection(_Section):
    dir: str | None = "datasets/pydoc-bytes"  # a directory written by `python -m data.prepare`
    seq_len: int | None = None  # tokens per training sequence; null = model.block_size
    # Instead of dir, a weighted mixture of such directories (data/mixture.py):
    # [{dir: datasets/web, weight: 0.7, name: web (default: the dir's name), epochs_cap: 2 (optional)}, ...]
    mix: list[dict] = field(default_factory=list)
    # Weights from a step on, e.g. an annealing phase: [{step: 900, weights: {web: 0.3, code: 0.7}}]
    mix_schedule: list[dict] = field(default_factory=list)

    def check(self) -> None:
        _check(
            not self.mix_schedule or bool(self.mix),
            "data.mix_schedule changes the weights of data.mix, which is not set",
        )


@dataclass
class OptimSection(_Section):
    """AdamW (Loshchilov & Hutter 2019). Defaults: GPT-3 (Brown et al. 2020, appendix B) / nanoGPT.
    Or Muon for the hidden matrices beside AdamW for the rest (train/optim.py; Jordan et al. 2024,
    https://kellerjordan.github.io/posts/muon/; defaults from there and from modded-nanogpt)."""

    name: str = "adamw"  # adamw | muon (Muon for the blocks' 2-D weights, AdamW for all other parameters)
    lr: float = 6e-4  # peak learning rate of AdamW (under muon: of the embeddings, head, gains, biases)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Decay only matmul weights by default (nanoGPT, minGPT): biases and norm gains never;
    # embeddings only if asked (nanoGPT decays them, minGPT and LLaMA recipes do not).
    decay_embeddings: bool = False
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    # null: fused AdamW where the device supports it, except where the parameters mix DTensors and plain
    # tensors (tensor parallel without FSDP), which torch's fused kernel cannot take
    fused: bool | None = None
    muon_lr: float = 0.02  # peak learning rate of Muon's group (the Muon post's and its reference code's 0.02)
    muon_momentum: float = 0.95  # Muon's momentum (Jordan et al. 2024)
    muon_momentum_start: float = 0.85  # momentum at step 0 when muon_momentum_warmup_steps > 0 (modded-nanogpt)
    muon_momentum_warmup_steps: int = 0  # linear momentum warmup from muon_momentum_start; 0 = off (modded: 300)
    muon_weight_decay: float = 0.0  # decoupled, times the scheduled lr (the Muon reference code's default 0)
    muon_nesterov: bool = True  # Nesterov momentum (Jordan et al. 2024)
    muon_ns_steps: int = 5  # Newton-Schulz iterations (Jordan et al. 2024: 5 suffice)
    # Update scale per matrix shape (torch.optim.Muon's adjust_lr_fn): original = sqrt(max(1, rows/cols))
    # (Jordan et al. 2024) | match_rms_adamw = 0.2 * sqrt(max(rows, cols)), AdamW's update RMS, so that
    # AdamW's lr and weight decay carry over (Liu et al. 2025, "Muon is Scalable for LLM Training")
    muon_adjust_lr: str = "original"
    # Newton-Schulz precision: auto = bfloat16 (torch.optim.Muon's) where the device has bf16 matrix units
    # (as train.dtype=auto), else float32 (CPUs without them emulate bf16 matmuls, far slower) | bfloat16 | float32
    muon_ns_dtype: str = "auto"

    def check(self) -> None:
        self._choose("name", OPTIMIZERS)
        self._choose("muon_adjust_lr", MUON_ADJUST_LR)
        self._choose("muon_ns_dtype", ("auto", "bfloat16", "float32"))
        self._bound(">=", 0, "lr", "weight_decay", "grad_clip", "muon_lr", "muon_weight_decay")
        self._bound(">=", 0, "muon_momentum_warmup_steps")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1); got {self.betas}",
        )
        for name in ("muon_momentum", "muon_momentum_start"):
            v = getattr(self, name)
            _check(0 <= v < 1, f"{self._key(name)} must be in [0, 1); got {v}")
        # torch.optim.Muon refuses 100 or more (its Newton-Schulz loop is meant to be short)
        n = self.muon_ns_steps
        _check(1 <= n < 100, f"optim.muon_ns_steps must be in [1, 99]; got {n}")


@dataclass
class ScheduleSection(_Section):
    name: str = "cosine"  # cosine | wsd | constant (all after a linear warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optim.lr (Chinchilla, Hoffmann et al. 2022: 10x decay)
    total_steps: int | None = None  # steps the schedule spans; null = train.max_steps (nanoGPT's lr_decay_iters)
    decay_frac: float = 0.2  # wsd: the final fraction of total_steps spent decaying (Hägele et al. 2024)
    wsd_shape: str = "linear"  # wsd decay: linear | 1-sqrt (Hägele et al. 2024 found 1-sqrt slightly better)

    def check(self) -> None:
        self._choose("name", SCHEDULES)
        self._choose("wsd_shape", WSD_SHAPES)
        self._bound(">=", 0, "warmup_steps")
        for name in ("min_lr_ratio", "decay_frac"):
            v = getattr(self, name)
            _check(0 <= v <= 1, f"{self._key(name)} must be in [0, 1]; got {v}")
        _check(self.total_steps is None or self.total_steps > 0, "schedule.total_steps must be > 0 or null")


@dataclass
class TrainSection(_Section):
    run_dir: str | None = None  # null: runs/<config file name without .yaml>
    max_steps: int = 1000  # optimizer steps
    tokens_per_step: int = 524288  # global batch in tokens; gradient accumulation makes up the rest
    micro_batch: int = 8  # sequences per forward/backward on one device
    device: str = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda | cuda:N
    # float32 | bfloat16 (autocast) | float16 (autocast + grad scaler, CUDA) | auto: bfloat16 where the
    # device has bf16 matrix units (CUDA >= Ampere, CPUs with AVX512-BF16/AMX), float16 on older GPUs,
    # float32 elsewhere
    dtype: str = "float32"
    compile: bool = False  # torch.compile the model
    # FP8 matmuls in the Linear layers through torchao (train/fp8.py): none | tensorwise (one scale per
    # tensor; fp8 FSDP and tensor-parallel all-gathers) | rowwise (one per row: closer to bf16, slower). A switch beside
    # train.dtype, not a value of it: the rest of the model (attention, norms, head) still runs in
    # train.dtype (bfloat16 is the pairing torchao and torchtitan use). Needs fp8 tensor cores (CUDA 8.9+).
    fp8: str = "none"
    fp8_emulate: bool = False  # torchao's emulation of the fp8 matmuls in high precision: any device, no speed-up
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, one more forward
    seed: int = 1337
    resume: str = "auto"  # auto: from run_dir's latest checkpoint if any | never | a checkpoint path
    init_from: str | None = None  # a model artifact / checkpoint / run dir: its weights, fresh optimizer
    eval_every: int = 250  # steps between val evaluations (and the last step); 0 = never
    eval_batches: int = 20  # val batches of micro_batch sequences per evaluation (per rank)
    # seconds without a completed step before the hang watchdog dumps every rank's stacks and exits
    # non-zero (train/watchdog.py); "auto": 10x the measured step time after warm-up (at least 300 s); "0": off
    step_timeout_s: str = "1800"

    def check(self) -> None:
        self._choose("dtype", TRAIN_DTYPES)
        _check(
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
            f"train.device must be auto, cpu, cuda or cuda:N; got {self.device!r}",
        )
        self._bound(">", 0, "max_steps", "tokens_per_step", "micro_batch", "eval_batches")
        self._bound(">=", 0, "eval_every")
        _check(bool(self.resume), "train.resume must be auto, never or a checkpoint path")
        _check(
            self.step_timeout_s == "auto" or _nonneg_number(self.step_timeout_s),
            f"train.step_timeout_s must be a number of seconds >= 0 (0 = off) or auto; got {self.step_timeout_s!r}",
        )


@dataclass
class GuardSection(_Section):
    """Loss spikes and non-finite steps (train/guard.py, docs/training.md "Spikes"). Off: a non-finite
    loss or gradient stops the run with a clear message."""

    enabled: bool = False  # skip an update whose loss or grad norm is non-finite or an outlier
    z_threshold: float = 6.0  # skip when the loss's or the grad norm's z-score exceeds this; 0 = non-finite only
    window: int = 128  # recent accepted steps the z-scores are measured against (llm.c's outlier window)
    warmup: int = 32  # accepted steps before outliers are judged (non-finite steps always are)
    rollback_skips: int = 0  # this many skips within rollback_within steps roll back; 0 = never roll back
    rollback_within: int = 100  # the window, in steps, that rollback_skips counts over
    max_rollbacks: int = 5  # the run stops (exit code 2) when one more rollback than this is called for; 0 = no cap

    def check(self) -> None:
        _check(self.z_threshold >= 0, f"guard.z_threshold must be >= 0 (0 = non-finite only); got {self.z_threshold}")
        self._bound(">=", 2, "window", "rollback_within")
        self._bound(">=", 0, "warmup", "rollback_skips", "max_rollbacks")


@dataclass
class CheckpointSection(_Section):
    every: int = 1000  # steps between checkpoints; 0 = only the final one (and on SIGTERM)
    keep_last: int = 3  # newest checkpoints kept; 0 = keep all
    keep_best: bool = True  # also save at an eval that improves val loss, and keep that one (`best`)
    save_final: bool = True  # save at the last step
    # write checkpoints in a background thread while training goes on (docs/checkpoints.md, "Asynchronous
    # saves"); `async` itself is a Python keyword
    async_save: bool = False

    def check(self) -> None:
        self._bound(">=", 0, "every", "keep_last")


@dataclass
class LoggingSection(_Section):
    log_every: int = 10  # steps between console / metrics.jsonl lines (the only host syncs)
    progress_bar: bool = True  # tqdm bar on a terminal
    sample_every: int = 0  # steps between text samples in the log; 0 = never
    sample_prompt: str = "\n"
    sample_tokens: int = 64
    sample_temperature: float = 0.8  # 0 = greedy
    sample_top_k: int | None = 50
    tensorboard: bool = False  # RUN_DIR/tensorboard, when the tensorboard package is installed
    wandb: bool = False  # Weights & Biases, when wandb is installed
    wandb_project: str = "gptrain"
    wandb_run_name: str | None = None
    profile_steps: int = 0  # > 0: torch.profiler trace of that many steps (after 3 warm-up steps)

    def check(self) -> None:
        self._bound(">", 0, "log_every")
        self._bound(">=", 0, "sample_every", "profile_steps", "sample_tokens", "sample_temperature")
        _check(
            self.sample_top_k is None or self.sample_top_k >= 1,
            f"logging.sample_top_k must be >= 1 or null (all tokens); got {self.sample_top_k}",
        )


@dataclass
class EvalSection(_Section):
    """Downstream evaluation during training (docs/evaluation.md, "During training"): HellaSwag
    (Zellers et al. 2019) scored by eval/hellaswag_score.py, the same code as `python -m eval.hellaswag`."""

    hellaswag_every: int = 0
    """Steps between HellaSwag evaluations (also at step 0 of a fresh run and at the last step); 0 = off."""
    hellaswag_data: str = f"{HF_PREFIX}{HF_NAME}"
    """A rowanz/hellaswag JSONL file (the validation split, 10,042 examples), or hf:NAME (a Hugging Face
    copy, downloaded once, then read from the datasets cache). Read and checked once, at start-up."""
    hellaswag_limit: int | None = None
    """Evaluate the first N examples only (fewer forward passes per evaluation); null = all."""
    hellaswag_style: str = "llmc"
    """llmc (llm.c's and build-nanogpt's method) or harness (lm-evaluation-harness's); see eval.hellaswag."""
    hellaswag_batch_size: int | None = None
    """Examples per forward pass (4 rows each); null = train.micro_batch // 4 (at least 1), so that the
    scoring batch has the training batch's rows (with train.compile, rows are padded to block_size too)."""

    def check(self) -> None:
        self._choose("hellaswag_style", HELLASWAG_STYLES)
        self._bound(">=", 0, "hellaswag_every")
        self._bound(">=", 1, "hellaswag_limit", "hellaswag_batch_size", allow_null=True)
        _check(
            bool(self.hellaswag_data.strip()),
            "eval.hellaswag_data is empty: give a rowanz/hellaswag JSONL file or hf:Rowan/hellaswag",
        )


@dataclass
class ParallelSection(_Section):
    """Read by the strategy (train/strategy.py, train/parallel/, train/strategies/). The torch-native
    layout is a device mesh of the degrees below (their product is the world size; one may be -1, "the
    rest"; docs/distributed.md); `strategy` none | ddp | fsdp are shorthands for meshes (ddp: dp_replicate
    takes the rest, fsdp: dp_shard does), deepspeed the separate data-parallel engine."""

    strategy: str = "none"  # none | ddp | fsdp | deepspeed
    dp_replicate: int = 1  # whole replicas (DDP; HSDP's replica groups)
    dp_shard: int = 1  # FSDP2 sharding of parameters, gradients and optimizer state
    tp: int = 1  # tensor parallel, with sequence parallel (Megatron-LM; Korthikanti et al. 2022)
    cp: int = 1  # context parallel: each rank holds 2 chunks of the sequence (Llama 3's recipe)
    pp: int = 1  # pipeline parallel stages (torch.distributed.pipelining)
    pp_schedule: str = "1F1B"  # 1F1B | Interleaved1F1B
    pp_stages_per_rank: int = 1  # 2 or more for Interleaved1F1B
    # expert parallel: each rank holds n_experts / ep experts of every MoE block, tokens travel by
    # all-to-all; borrowed from dp_shard x cp, which it must divide (train/parallel/expert.py)
    ep: int = 1
    async_tp: bool = False
    """Async tensor parallel (torchtitan's enable_async_tensor_parallel): inductor's micro-pipeline TP pass
    splits each all-gather -> matmul and matmul -> reduce-scatter of the compiled blocks into chunks
    whose transfers (over the tp group's symmetric memory) overlap the matmuls. Needs parallel.tp > 1,
    train.compile=true and CUDA GPUs (train/parallel/parallelize.py's enable_async_tp)."""
    fsdp_param_dtype: str | None = None  # FSDP2 MixedPrecisionPolicy param dtype; null = train.dtype
    fsdp_reduce_dtype: str | None = "float32"  # gradient reduce-scatter dtype
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (Rajbhandari et al. 2020)
    deepspeed_config: str | None = None  # a DeepSpeed JSON config; overrides what we derive
    offload_optimizer: bool = False  # DeepSpeed ZeRO-Offload of the optimizer to CPU
    deepspeed: dict = field(default_factory=dict)  # free-form keys merged into the DeepSpeed config

    def check(self) -> None:
        self._choose("strategy", STRATEGIES)
        self._choose("zero_stage", (0, 1, 2, 3))
        self._choose("pp_schedule", PP_SCHEDULES)
        for d in DIMS:
            v = getattr(self, d)
            _check(isinstance(v, int) and (v >= 1 or v == -1), f"parallel.{d} must be >= 1 or -1 (the rest); got {v!r}")
        _check(self.pp_stages_per_rank >= 1, "parallel.pp_stages_per_rank must be >= 1")
        mesh = [
            f"parallel.{d}={getattr(self, d)}" for d in (*DIMS, "ep") if d != "dp_replicate" and getattr(self, d) != 1
        ]
        _check(
            self.strategy != "deepspeed" or not mesh,
            f"parallel.strategy=deepspeed is data parallel only (ZeRO), but {', '.join(mesh)} is set: use "
            "parallel.strategy=fsdp (the torch-native mesh) for tensor, context, pipeline or expert parallel",
        )
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            if getattr(self, name) is not None:
                self._choose(name, CANONICAL)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=_model_section)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    guard: GuardSection = field(default_factory=GuardSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.block_size

    def parallel_options(self) -> dict:
        """What make_strategy(name, device, spec, **options) receives: the parallel section less the name
        (compile and activation checkpointing travel in the StrategySpec, from the train section)."""
        opts = dataclasses.asdict(self.parallel)
        opts.pop("strategy")
        return opts


# ----------------------------------------------------------------------------- loading


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def valid_keys() -> list[str]:
    """Every `section.field` key, in declaration order."""
    return [f"{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls)]


def suggest(key: str) -> str:
    """' (did you mean X?)' for the closest valid key, or ''."""
    keys = valid_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:  # a bare or misplaced field name: compare the last component alone
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
        match = [leaves[close[0]]] if close else []
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {
        int: "an integer",
        float: "a number",
        bool: "true/false",
        str: "a string",
        dict: "a mapping",
        type(None): "null",
    }.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, raw: str | None = None) -> Any:
    """value checked/converted to tp (YAML-parsed); raw is the command-line text, if any."""
    bad = ConfigError(
        f"config key {key!r} expects {_type_name(tp)}, got {value!r}"
        + (f" ({type(value).__name__})" if value is not None else "")
    )
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, raw)
            except ConfigError:
                pass
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # 5e5 written as a count
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `6e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and value is not None:  # `train.run_dir=123` on the command line is a name
            return raw
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (elem,) = get_args(tp)
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")  # a bug in this file, not user error


def _field_types(section: str) -> dict[str, Any]:
    cls = _sections()[section]
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _set(kw: dict[str, dict], key: str, value: Any, raw: str | None = None) -> None:
    """Record `section.field = value` (type-checked) in kw, the keyword arguments of each section."""
    parts = key.split(".")
    sections = _sections()
    if len(parts) < 2 or parts[0] not in sections:
        what = "section" if len(parts) >= 2 else "key (expected section.field)"
        raise ConfigError(f"unknown config {what} in {key!r}{suggest(key)}; sections: {', '.join(sections)}")
    types_ = _field_types(parts[0])
    name = parts[1]
    if name not in types_:
        raise ConfigError(f"unknown config key {'.'.join(parts[:2])!r}{suggest(key)}")
    tp = types_[name]
    section = kw.setdefault(parts[0], {})
    if len(parts) > 2:  # a nested key inside a free-form dict field (parallel.deepspeed.a.b=1)
        if tp is not dict:
            raise ConfigError(f"config key {'.'.join(parts[:2])!r} has no sub-keys (got {key!r})")
        if name not in section:
            section[name] = copy.deepcopy(getattr(getattr(Config(), parts[0]), name))
        node = section[name]
        for p in parts[2:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {p!r} is not a mapping")
        node[parts[-1]] = value
        return
    section[name] = _coerce(value, tp, key, raw)


def _model(kwargs: dict[str, Any]) -> ModelConfig:
    """ModelConfig(**kwargs), its own checks (head divisibility, GQA needs family modern, ...) reported
    as a ConfigError."""
    try:
        return ModelConfig(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _build(kw: dict[str, dict]) -> Config:
    """Each section made once from its defaults and the keys given, so that its checks see final values."""
    sections = {}
    for name, cls in _sections().items():
        args = {**_CONFIG_DEFAULTS.get(name, {}), **kw.get(name, {})}
        sections[name] = _model(args) if cls is ModelConfig else cls(**args)
    return Config(**sections)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """YAML mapping -> [(dotted key, value)], descending into sections only (dict fields stay whole)."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if not prefix and isinstance(v, dict):
            out += _flatten(v, key + ".")
        elif not prefix:
            raise ConfigError(f"config section {key!r} must be a mapping of keys, got {v!r}{suggest(key)}")
        else:
            out.append((key, v))
    return out


_OVERRIDE = re.compile(r"^([A-Za-z_][\w.-]*)=(.*)$", re.S)


def parse_override(text: str) -> tuple[str, Any, str]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001 as YAML reads it, '1e-3')."""
    m = _OVERRIDE.match(text.strip() if "=" in text else "")
    if not m:
        raise ConfigError(f"cannot read override {text!r}: write section.key=value, e.g. optim.lr=3e-4")
    key, raw = m.group(1), m.group(2)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # e.g. a prompt with a colon: keep the text as written
    return key, value, raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- command-line overrides, then validated."""
    kw: dict[str, dict] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass one of configs/*.yaml with --config")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path} must be a mapping of sections (model:, data:, optim:, ...)")
        for key, value in _flatten(doc):
            try:
                _set(kw, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        key, value, raw = parse_override(text)
        _set(kw, key, value, raw)
    cfg = _build(kw)
    if cfg.train.run_dir is None:
        cfg.train.run_dir = str(Path("runs") / (Path(path).stem if path is not None else "default"))
    _data_source(cfg, kw)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> Config:
    """A Config from to_dict()'s output (a checkpoint's copy), with the same checks as a YAML file."""
    kw: dict[str, dict] = {}
    for key, value in _flatten(d):
        _set(kw, key, value)
    cfg = _build(kw)
    _data_source(cfg, kw)
    validate(cfg)
    return cfg


def _data_source(cfg: Config, kw: dict[str, dict]) -> None:
    """data.dir and data.mix are alternatives: exactly one names the training data. data.dir has a
    default (the demo dataset), so it counts as given only when set; under data.mix it becomes null."""
    given_dir = kw.get("data", {}).get("dir", None)
    if cfg.data.mix and given_dir is not None:
        raise ConfigError(
            f"data.dir={given_dir} and data.mix are both set: train on one dataset (data.dir) or a mixture "
            "(data.mix), not both; remove one of them (override a config file's with data.dir=null)"
        )
    if cfg.data.mix:
        cfg.data.dir = None
    elif cfg.data.dir is None:
        raise ConfigError("no training data: set data.dir to a prepared dataset, or data.mix to a list of them")


# ----------------------------------------------------------------------------- checks


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}{hint}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _nonneg_number(v: Any) -> bool:
    try:
        return float(v) >= 0
    except (TypeError, ValueError):
        return False


def validate(cfg: Config) -> None:
    """Value checks that need no data and no device (each section's own, then the cross-section ones);
    the rest are made at start-up."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if isinstance(section, ModelConfig):
            _model(dataclasses.asdict(section))  # the model's own checks, again on the values as they are now
        else:
            section.check()
    _cross_checks(cfg)


def _cross_checks(cfg: Config) -> None:
    """What one section asks of another: Muon of the strategy, the sequence of the model and the batch,
    the mesh degrees of the model."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    _check(
        cfg.optim.name != "muon" or p.strategy in MUON_STRATEGIES,
        f"optim.name=muon is not supported under parallel.strategy={p.strategy}: "
        f"{_MUON_REFUSED.get(p.strategy, 'its optimizer does not see whole matrices')}, and Muon's "
        "Newton-Schulz step needs each weight matrix whole; use parallel.strategy=ddp or fsdp (or none), "
        "or optim.name=adamw",
    )
    _check(
        cfg.seq_len <= m.block_size,
        f"data.seq_len ({cfg.seq_len}) exceeds model.block_size ({m.block_size}); lower it or raise block_size",
    )
    rows = cfg.seq_len * t.micro_batch
    _check(
        t.tokens_per_step % rows == 0,
        f"train.tokens_per_step ({t.tokens_per_step}) must be a multiple of seq_len * micro_batch "
        f"({cfg.seq_len} * {t.micro_batch} = {rows}); e.g. {max(1, round(t.tokens_per_step / rows)) * rows}",
    )
    _validate_fp8(cfg)
    check_model(p, m, cfg.seq_len)  # what the mesh degrees ask of the model (MeshError: a ConfigError)
    if p.async_tp:  # what async TP asks of the layout, the compile switch and the device
        check_async_tp(p.tp, t.compile, t.device)


def _validate_fp8(cfg: Config) -> None:
    """train.fp8: the recipe, and the layouts it composes with (FSDP2, DDP, tensor and pipeline
    parallel, compile)."""
    t, p = cfg.train, cfg.parallel
    _choice("train.fp8", t.fp8, FP8_RECIPES)
    if t.fp8 == "none":
        _check(not t.fp8_emulate, "train.fp8_emulate=true needs a recipe: set train.fp8=tensorwise or rowwise")
        return
    _check(
        p.strategy != "deepspeed",
        f"train.fp8={t.fp8} runs on the torch-native layouts: use parallel.strategy=fsdp or ddp (or none), "
        "not deepspeed",
    )
