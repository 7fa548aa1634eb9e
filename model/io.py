"""The model artifact: model/'s one piece of I/O.

An artifact is a directory holding
    model.safetensors   the weights (no pickle: loading never runs code)
    model.json          {"format": 1, "config": ModelConfig, "metadata": {...}}
metadata is opaque here: tokenizer spec, quantization, step, ... (written by train/ and eval/).

This module also opens whatever a user points eval/ at: an artifact, a checkpoint
(`step_N/model/` or a sharded `step_N/dcp/`), or a run directory (its latest checkpoint);
the run-directory layout is in ../shared/DESIGN.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.errors import UserError
from model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
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
    """Write an artifact atomically: into a temporary sibling directory, then renamed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output path or remove it")
    sd = state.state_dict() if isinstance(state, torch.nn.Module) else state
    sd = clean_state_dict(sd)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as transformer.wte.weight
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS))
    doc = {"format": FORMAT, "config": config.to_dict(), "metadata": metadata or {}}
    (tmp / CONFIG).write_text(json.dumps(doc, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_config(artifact_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, metadata) from an artifact's (or a sharded checkpoint's) model.json."""
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
    """An artifact dir, or a sharded checkpoint dir (with dcp/), from any path a user may give:
    the artifact itself, a checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p} does not exist; pass a run directory, a checkpoint or a model artifact")
    if (p / WEIGHTS).is_file() and (p / CONFIG).is_file():
        return p
    if (p / "model" / CONFIG).is_file():
        return p / "model"
    if (p / "dcp").is_dir() and (p / CONFIG).is_file():
        return p
    if (p / "checkpoints").is_dir():
        ck = latest_checkpoint(p)
        if ck is None:
            raise ArtifactError(f"run directory {p} has no complete checkpoint yet (no checkpoints/latest)")
        return resolve(ck)
    raise ArtifactError(
        f"{p} holds no model: expected {WEIGHTS} + {CONFIG} (an artifact), model/ or dcp/ "
        "(a checkpoint) or checkpoints/latest (a run directory)"
    )


def load_dcp_state(ckpt_dir: str | os.PathLike, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model part of a torch.distributed.checkpoint written by train/ (keys "model.<name>"),
    read in one process without a process group; the optimizer state is not loaded."""
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):
        model = GPT(config)
    sd = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    dcp.load({"model": sd}, checkpoint_id=str(Path(ckpt_dir) / "dcp"))
    return sd


def load_state(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(config, state_dict, metadata) from any path resolve() accepts."""
    p = resolve(path)
    config, metadata = read_config(p)
    if (p / "dcp").is_dir():
        return config, load_dcp_state(p, config), metadata
    try:
        sd = load_file(str(p / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ArtifactError(f"{p / WEIGHTS} cannot be read ({e}); the artifact is corrupt") from None
    return config, sd, metadata


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, dict]:
    """(model in eval mode, metadata). An int8 artifact loads through model.quantize (dtype must be None)."""
    config, sd, metadata = load_state(path)
    if metadata.get("quantization") == "int8":
        if dtype is not None:
            raise ArtifactError(f"{path} is an int8 artifact; it runs in float32 activations, not {dtype}")
        from model.quantize import from_quantized_state  # model.quantize imports this module

        return from_quantized_state(config, sd, metadata, device=device, where=str(path))
    if metadata.get("quantization"):
        raise ArtifactError(f"{path}: unknown quantization {metadata['quantization']!r} (known: int8)")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # recomputes non-persistent buffers (RoPE tables)
    if config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ArtifactError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval(), metadata
