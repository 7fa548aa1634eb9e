"""What the prepared dataset fixes about a run: its metadata (meta.json) and the model config it implies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from model import GPT, ModelConfig
from model.io import ArtifactError, load_state
from train.config import Config
from train.errors import TrainError


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
    if fields["doc_mask"] and fields["eot_id"] is None:  # document masking splits at the dataset's EOT
        fields["eot_id"] = meta.get("eot_id")
    return ModelConfig(**{**fields, "vocab_size": vocab}), None


def build_model(cfg: Config, mcfg: ModelConfig, init_weights: dict | None) -> GPT:
    """The GPT to train: freshly initialised (from the torch RNG as seeded), or with train.init_from's weights."""
    model = GPT(mcfg)
    if init_weights is not None:
        try:
            model.load_weights(init_weights)
        except ValueError as e:
            raise TrainError(f"train.init_from={cfg.train.init_from}: {e}") from None
    return model


def vocab_size(cfg: Config) -> int:
    """model.vocab_size, else the config's dataset's or data.mix's shared one (when prepared), else GPT-2's
    50257. The batches are random tokens, so a dataset that is not there only changes this default."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    try:
        if cfg.data.mix:
            from data.mixture import mix_meta, parse_mix

            return int(mix_meta(parse_mix(cfg.data.mix)[0])["vocab_size"])
        from data.shards import read_meta

        return int(read_meta(cfg.data.dir)["vocab_size"])
    except (OSError, ValueError, KeyError):  # DataError is a ValueError: missing or unreadable meta.json
        return 50257


def bench_model_config(cfg: Config) -> ModelConfig:
    """cfg.model with the vocabulary filled in (vocab_size's rule) and, under document masking, an
    <|endoftext|> id: the last id of both tokenizers (bytes 256, GPT-2 50256). Random tokens hit it
    once in V, so the masked windows hold a document or two, as real text does."""
    V = vocab_size(cfg)
    eot = V - 1 if cfg.model.doc_mask and cfg.model.eot_id is None else cfg.model.eot_id
    return dataclasses.replace(cfg.model, vocab_size=V, eot_id=eot)


def bench_batches(cfg: Config, vocab_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step of seeded random (inputs, targets) micro-batches, each (micro_batch, seq_len)
    int64: the benchmarks' stand-in for data (train.bench, train.bench_checkpoint)."""
    seq, mb = cfg.seq_len, cfg.train.micro_batch
    g = torch.Generator().manual_seed(0)
    tokens = lambda: torch.randint(0, vocab_size, (mb, seq), generator=g).to(device)  # noqa: E731 -- (mb, seq)
    return [(tokens(), tokens()) for _ in range(cfg.train.tokens_per_step // (seq * mb))]
