"""The network (GPT, KVCache), its config, and what turns it into an inference artifact."""

from model.config import PRESETS, ModelConfig
from model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS"]
