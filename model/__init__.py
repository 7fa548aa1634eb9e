"""The network (GPT, KVCache), its config, and what turns it into an inference artifact.

GPT and KVCache are imported on first use, so that the torch-free parts (model.config, model.errors,
model.dtypes, model.files) can be imported by config parsing and error reporting without torch.
"""

from model.config import PRESETS, ModelConfig

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS"]


def __getattr__(name: str):
    if name in ("GPT", "KVCache"):
        from model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
