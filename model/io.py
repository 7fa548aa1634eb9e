"""The model artifact: model/'s one piece of I/O.

An artifact is a directory holding
    model.safetensors   the weights (no pickle: loading never runs code)
    model.json          {"format": 1, "config": ModelConfig, "metadata": {...}}
metadata is opaque here: tokenizer spec, quantization, step, ... (written by train/ and eval/).

`resolve` opens whatever a user points train/ or eval/ at: an artifact, a checkpoint (its `model/`),
or a run directory (the checkpoint its `checkpoints/latest` names). That much of the run-directory
layout is the artifact's contract and lives here; train/checkpoint.py owns the rest of it
(docs/checkpoints.md). A checkpoint without `model/` (an FSDP checkpoint between best and final) is
turned into one with `python -m train.consolidate`; model/ reads artifacts only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.errors import UserError
from model.files import atomic_dir
from model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
MODEL_DIR = "model"  # a checkpoint's artifact: RUN/checkpoints/step_N/model
FORMAT = 1
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


class ArtifactError(UserError):
    """A path that holds no model we can read; the message says what was expected."""


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip compile / DDP wrapper prefixes so that saved names are the bare model's."""
    out = {}
    for k, v in state_dict.items():
        for p in _WRAPPER_PREFIXES:
            while p in k:
                k = k.replace(p, "")
        out[k] = v
    return out


def save_artifact(
    out_dir: str | os.PathLike,
    state: torch.nn.Module | dict[str, torch.Tensor],
    config: ModelConfig,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an artifact atomically (model.files.atomic_dir: built beside, published by one rename)."""
    sd = state.state_dict() if isinstance(state, torch.nn.Module) else state
    sd = clean_state_dict(sd)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    doc = {"format": FORMAT, "config": config.to_dict(), "metadata": metadata or {}}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    return Path(out_dir)


def read_config(artifact_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, metadata) from an artifact's model.json."""
    path = Path(artifact_dir) / CONFIG
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} not found: not a model artifact") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the artifact is corrupt") from None
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unsupported artifact format {doc.get('format')!r} (expected {FORMAT})")
    return ModelConfig.from_dict(doc["config"]), doc.get("metadata", {})


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by RUN/checkpoints/latest, or None when the run has none yet."""
    ckpts = Path(run_dir) / "checkpoints"
    latest = ckpts / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    path = ckpts / name
    if not path.is_dir():
        raise ArtifactError(f"{latest} names {name!r}, which does not exist; the run directory is damaged")
    return path


def resolve(path: str | os.PathLike) -> Path:
    """The artifact directory behind any path a user may give: the artifact itself, a checkpoint
    directory (its model/), or a run directory (its latest checkpoint's model/)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p} does not exist; pass a run directory, a checkpoint or a model artifact")
    if (p / WEIGHTS).is_file() and (p / CONFIG).is_file():
        return p
    if (p / MODEL_DIR / CONFIG).is_file():
        return p / MODEL_DIR
    if (p / "checkpoints").is_dir():
        ck = latest_checkpoint(p)
        if ck is None:
            raise ArtifactError(f"run directory {p} has no complete checkpoint yet (no checkpoints/latest)")
        return resolve(ck)
    if (p / "state").is_dir() or (p / "train_state.pt").is_file():
        raise ArtifactError(
            f"checkpoint {p} holds no model artifact (FSDP writes one at the best and final checkpoints only); "
            f"write it with `python -m train.consolidate {p}`"
        )
    raise ArtifactError(
        f"{p} holds no model: expected {WEIGHTS} + {CONFIG} (an artifact), {MODEL_DIR}/ (a checkpoint) "
        "or checkpoints/latest (a run directory)"
    )


def load_state(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, state_dict, metadata) from any path resolve() accepts, as stored (float or quantized)."""
    p = resolve(path)
    config, metadata = read_config(p)
    try:
        sd = load_file(str(p / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ArtifactError(f"{p / WEIGHTS} cannot be read ({e}); the artifact is corrupt") from None
    return config, sd, metadata


def to_empty(model: torch.nn.Module, device) -> None:
    """model.to_empty(device=device), through torch.empty: to_empty's empty_like on a meta tensor runs a
    Python reference that imports sympy and torch.fx's symbolic shapes (a third of eval.sample's start-up)."""
    model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, dict]:
    """(float model in eval mode, metadata). A quantized artifact is refused: eval/ chooses its
    loader (eval.backends; model.quantize.load_quantized for int8)."""
    config, sd, metadata = load_state(path)
    if metadata.get("quantization"):
        raise ArtifactError(
            f"{path} is a {metadata['quantization']} artifact; load it through eval (--backend int8, "
            "eval.backends.load_checkpoint_model) or model.quantize.load_quantized"
        )
    with torch.device("meta"):
        model = GPT(config)
    to_empty(model, device)
    if config.tie_embeddings:  # to_empty gives each module its own tensor: tie again
        model.lm_head.weight = model.transformer.wte.weight
    model.init_weights()  # recomputes non-persistent buffers (RoPE tables)
    try:
        model.load_weights(sd)
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval(), metadata
