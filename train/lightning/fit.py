"""The run of `python -m train.lightning`: gptrain's config -> lightning.Trainer, GPTModule, GPTDataModule.

Config key -> Trainer argument (docs/training.md, "With PyTorch Lightning", shows the same map):
    train.max_steps            max_steps
    train.tokens_per_step      accumulate_grad_batches: the loader's accumulation steps (tokens_per_step /
                               (micro_batch x seq_len x ranks)), as train/loop.py
    train.dtype                precision: float32 32-true, bfloat16 bf16-mixed, float16 16-mixed (auto: train/device.py)
    train.device               accelerator: auto, cpu, cuda -> gpu, mps
    parallel.strategy          strategy: none -> auto, ddp, fsdp, deepspeed (stage parallel.zero_stage, config
                               parallel.deepspeed_config)
    torchrun's environment     devices = LOCAL_WORLD_SIZE, num_nodes = WORLD_SIZE / LOCAL_WORLD_SIZE
    optim.grad_clip            gradient_clip_val, by norm (0: none)
    train.eval_every           val_check_interval, in batches (x accumulation); 0: no validation
    logging.log_every          log_every_n_steps
    logging.progress_bar       enable_progress_bar
    logging.tensorboard        a TensorBoardLogger in RUN/tensorboard beside the CSVLogger in RUN/lightning
    checkpoint.every           ModelCheckpoint(every_n_train_steps), the newest checkpoint.keep_last kept
    checkpoint.keep_best       ModelCheckpoint(monitor="val_loss") -> RUN/checkpoints/best.ckpt
    train.resume               fit(ckpt_path=): auto -> RUN/checkpoints/last.ckpt when there, never, or a .ckpt
At the end the run writes RUN/checkpoints/last.ckpt and converts it to the artifact RUN/model.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from train.config import Config
from train.dataset import build_model, build_model_config
from train.device import pick_device, resolve_dtype
from train.errors import TrainError
from train.lightning.artifact import LAST, MODEL, to_artifact
from train.lightning.data import GPTDataModule
from train.lightning.module import GPTModule
from train.loop import Data, set_seeds
from train.parallel.dims import DIMS
from train.parallel.world import env_world

PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}
ACCELERATOR = {"auto": "auto", "cpu": "cpu", "cuda": "gpu", "mps": "mps"}
# What train/loop.py does that this run does not; each is named in the log when the config asks for it.
IGNORED = {
    "train.compile": lambda c: c.train.compile,
    "train.activation_checkpointing": lambda c: c.train.activation_checkpointing,
    "logging.sample_every": lambda c: c.logging.sample_every > 0,
    "eval.hellaswag_every": lambda c: c.eval.hellaswag_every > 0,
    "logging.wandb": lambda c: c.logging.wandb,
    "logging.profile_steps": lambda c: c.logging.profile_steps > 0,
}


def check_supported(cfg: Config) -> None:
    """The settings that would change what trains, which Lightning's strategies do not have: an error."""
    if cfg.parallel.strategy not in ("none", "ddp", "fsdp", "deepspeed"):
        raise TrainError(
            f"parallel.strategy={cfg.parallel.strategy} is not run under Lightning: use none, ddp, fsdp or deepspeed"
        )
    degrees = {d: getattr(cfg.parallel, d) for d in DIMS if getattr(cfg.parallel, d, 1) != 1}
    if degrees:
        raise TrainError(
            f"mesh degrees {degrees} are gptrain's own loop's (python -m train); under Lightning set "
            "parallel.strategy to none, ddp, fsdp or deepspeed and leave the degrees at 1"
        )
    if cfg.guard.enabled:
        raise TrainError("guard.enabled=true is gptrain's own loop's (python -m train); set guard.enabled=false")
    if cfg.train.fp8 != "none":
        raise TrainError(
            f"train.fp8={cfg.train.fp8} is gptrain's own loop's (python -m train, train/fp8.py); set train.fp8=none"
        )
    sharded = cfg.parallel.strategy in ("fsdp", "deepspeed")
    if sharded and pick_device(cfg.train.device).type != "cuda":
        raise TrainError(
            f"parallel.strategy={cfg.parallel.strategy} under Lightning needs CUDA GPUs (Lightning's "
            f"{'FSDPStrategy' if cfg.parallel.strategy == 'fsdp' else 'DeepSpeedStrategy'} does not run on "
            f"{pick_device(cfg.train.device).type}); use parallel.strategy=ddp, or python -m train for fsdp / "
            "deepspeed on the CPU"
        )
    if cfg.optim.name == "muon" and sharded:
        raise TrainError(
            f"optim.name=muon under Lightning's {cfg.parallel.strategy} is not supported (its flat sharded "
            "parameters are not matrices); use parallel.strategy=ddp or optim.name=adamw"
        )


def strategy_arg(cfg: Config):
    name = cfg.parallel.strategy
    if name == "none":
        return "auto"
    if name == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=cfg.parallel.zero_stage, config=cfg.parallel.deepspeed_config)
    return name  # ddp, fsdp: Lightning's, with gloo on the CPU and NCCL on GPUs


def trainer_args(cfg: Config, grad_accum_steps: int, world_size: int) -> dict:
    """lightning.Trainer's arguments for this config (the map in the module docstring)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = resolve_dtype(pick_device(cfg.train.device))
    every = cfg.train.eval_every
    return dict(
        max_steps=cfg.train.max_steps,
        accumulate_grad_batches=grad_accum_steps,
        precision=PRECISION[dtype],
        accelerator=ACCELERATOR.get(cfg.train.device, cfg.train.device),
        strategy=strategy_arg(cfg),
        devices=local,
        num_nodes=max(1, world_size // local),
        gradient_clip_val=cfg.optim.grad_clip or None,
        gradient_clip_algorithm="norm",
        val_check_interval=every * grad_accum_steps if every > 0 else None,
        check_val_every_n_epoch=None,  # the stream is endless: validation counts batches
        limit_val_batches=None if every > 0 else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.logging.log_every,
        enable_progress_bar=cfg.logging.progress_bar,
        use_distributed_sampler=False,  # the loader hands each rank its own part already
        default_root_dir=cfg.train.run_dir,
    )


def callbacks(cfg: Config, ckpt_dir: Path) -> list:
    rules, out = cfg.checkpoint, []
    if rules.every > 0:
        out.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="step_{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=rules.every,
                monitor="step",  # the newest keep_last of them
                mode="max",
                save_top_k=rules.keep_last if rules.keep_last > 0 else -1,
            )
        )
    if rules.keep_best and cfg.train.eval_every > 0:
        out.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1))
    return out


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    resume = cfg.train.resume
    if resume == "never":
        return None
    if resume == "auto":
        return run_dir / LAST if (run_dir / LAST).is_file() else None
    path = Path(resume)
    if path.is_dir() and (path / LAST).is_file():
        return path / LAST
    if not path.is_file():
        raise TrainError(f"train.resume={resume}: no such Lightning checkpoint (use auto, never or a .ckpt file)")
    return path


def run(cfg: Config, log=print) -> dict:
    """Train as configured under lightning.Trainer; returns {"step", "val_loss", "artifact"}."""
    check_supported(cfg)
    rank, _, world_size = env_world()
    run_dir = Path(cfg.train.run_dir)
    ckpt_path = resume_path(cfg, run_dir)
    if rank == 0 and cfg.train.resume == "never" and (run_dir / "checkpoints").exists():
        shutil.rmtree(run_dir / "checkpoints")
    for key, asked in IGNORED.items():
        if asked(cfg) and rank == 0:
            log(f"note: {key} is gptrain's own loop's and is not applied under Lightning")
    # Batches stay on the CPU; Lightning moves them to the device.
    data = Data.open(cfg, rank, world_size, torch.device("cpu"))
    set_seeds(cfg.train.seed + rank)  # the weights of train/loop.py's run (DDP broadcasts rank 0's)
    mcfg, init_weights = build_model_config(cfg, data.meta)
    model = build_model(cfg, mcfg, init_weights)
    grad_accum = data.train_loader(mcfg.vocab_size).grad_accum_steps
    metadata = {
        "tokenizer": data.meta["tokenizer"],
        "tokenizer_sha256": data.meta.get("tokenizer_sha256"),
        "eot_id": data.meta.get("eot_id"),
        "dataset": data.label,
    }
    weights = [s.weight for s in data.mix[0]] if data.mix else [1.0]  # Data.val_sets' order
    module = GPTModule(cfg, model, metadata, weights)
    datamodule = GPTDataModule(data, mcfg.vocab_size, grad_accum)
    loggers = [CSVLogger(run_dir, name="lightning")]
    if cfg.logging.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard"))
    trainer = L.Trainer(
        **trainer_args(cfg, grad_accum, world_size), callbacks=callbacks(cfg, run_dir / "checkpoints"), logger=loggers
    )
    with warnings.catch_warnings():
        # The stream is endless and read in the main process on purpose (data/torch_data.py keeps its order
        # with workers too, but the windows are memory-mapped and cheap).
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if cfg.train.eval_every > 0 and module.val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.save_checkpoint(run_dir / LAST, weights_only=False)  # the full state: resumable
    artifact = run_dir / MODEL
    if trainer.is_global_zero:
        to_artifact(run_dir / LAST, artifact)
        val = f" | val loss {module.val_loss:.4f}" if module.val_loss is not None else ""
        log(f"done: {trainer.global_step} steps{val} | checkpoint {run_dir / LAST} | artifact {artifact}")
    return {"step": trainer.global_step, "val_loss": module.val_loss, "artifact": str(artifact)}
