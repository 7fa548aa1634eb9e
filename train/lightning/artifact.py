"""A Lightning checkpoint of `python -m train.lightning` -> gptrain's model artifact (model/io.py).

The checkpoint is a torch.save'd dict: Lightning's "state_dict" holds the GPT's weights under
GPTModule's `model.` prefix, and GPTModule.on_save_checkpoint adds "gptrain" (the ModelConfig and the
artifact's metadata) as plain data, so it loads with weights_only=True and needs no lightning to read.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from model.config import ModelConfig
from model.io import save_artifact
from train.errors import TrainError

PREFIX = "model."  # GPTModule.model
LAST = "checkpoints/last.ckpt"  # in the run directory: the checkpoint written at the end of the run
MODEL = "model"  # in the run directory: the artifact written at the end of the run


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise TrainError(
            f"{path} is a directory: a DeepSpeed checkpoint; make one file of it first with "
            "lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_state_dict"
        )
    if not path.is_file():
        raise TrainError(f"{path}: no such Lightning checkpoint (RUN/checkpoints/*.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise TrainError(f"{path} is not a readable Lightning checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "gptrain" not in ckpt or "state_dict" not in ckpt:
        raise TrainError(f"{path} is not a checkpoint of `python -m train.lightning` (no 'gptrain' entry)")
    return ckpt


def to_artifact(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's model as an artifact at out_dir (replacing one that is there)."""
    ckpt = load_checkpoint(ckpt_path)
    state = {k.removeprefix(PREFIX): v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    info = ckpt["gptrain"]
    return save_artifact(out_dir, state, ModelConfig.from_dict(info["model_config"]), info["metadata"], overwrite=True)
