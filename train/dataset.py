"""What the prepared dataset fixes about a run: its metadata (meta.json) and the model config it implies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from model import ModelConfig
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
