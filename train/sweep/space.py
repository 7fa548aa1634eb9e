"""The search space of a sweep: a YAML file keyed by the training config's own dotted keys.

    optim.lr: {log_float: [1.0e-4, 1.0e-2]}        # sampled log-uniformly
    model.dropout: {float: [0.0, 0.2]}              # uniformly; `step: 0.05` makes it a grid
    schedule.warmup_steps: {int: [0, 200], step: 50}
    train.tokens_per_step: {categorical: [2048, 4096]}

Kinds: float, log_float, int, log_int, categorical (Optuna's suggest_* families). The whole space is
checked before any trial starts: each key through train/config.py's own loader (unknown keys get the
training CLI's did-you-mean, values the same type checks), both ends of every range and every choice
applied to the base config, so that a value no trial could train with fails now and not after hours.

Optuna is imported lazily: this module and the checks need only PyYAML.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from train.config import Config, load_config, valid_keys
from train.errors import ConfigError

SET_BY_SWEEP = ("train.run_dir", "train.resume")  # each trial's own
KINDS = ("float", "log_float", "int", "log_int", "categorical")
EXAMPLE = "e.g. `optim.lr: {log_float: [1.0e-4, 1.0e-2]}` or `train.tokens_per_step: {categorical: [2048, 4096]}`"


@dataclass(frozen=True)
class Param:
    key: str  # a dotted config key, also the Optuna parameter name
    kind: str  # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value of this parameter in an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        log = self.kind.startswith("log_")
        if self.kind.endswith("int"):
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=log)

    def samples(self) -> list:
        """Values that every trial's config must accept: the ends, an inner point (a float in an int
        field is caught there), each choice."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind.endswith("int"):
            return [self.low, self.high]
        mid = math.sqrt(self.low * self.high) if self.kind == "log_float" else (self.low + self.high) / 2
        return [self.low, mid, self.high]


def _number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def parse_param(key: str, spec: Any, where: str) -> Param:
    """One `key: {kind: ...}` entry, its shape checked (the key itself is checked by check_space)."""
    bad = f"{where}: {key}: "
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{bad}expected a mapping such as {{log_float: [low, high]}}, got {spec!r}; {EXAMPLE}")
    kinds = [k for k in spec if k != "step"]
    if len(kinds) != 1 or kinds[0] not in KINDS:
        unknown = next((k for k in kinds if k not in KINDS), None)
        hint = difflib.get_close_matches(str(unknown), KINDS, n=1) if unknown is not None else []
        raise ConfigError(
            f"{bad}give exactly one of {', '.join(KINDS)} (and optionally step), got {', '.join(map(str, spec))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    kind, value = kinds[0], spec[kinds[0]]
    if kind == "categorical":
        if "step" in spec:
            raise ConfigError(f"{bad}categorical takes no step")
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{bad}categorical needs a non-empty list of choices, got {value!r}")
        if len(set(map(repr, value))) != len(value):
            raise ConfigError(f"{bad}categorical choices repeat a value: {value!r}")
        return Param(key, kind, choices=tuple(value))
    integer = kind.endswith("int")
    what = "integers" if integer else "numbers"
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v, integer) for v in value)):
        raise ConfigError(f"{bad}{kind} needs [low, high] with two {what}, got {value!r}")
    low, high = (int(v) if integer else float(v) for v in value)
    if not low < high:
        raise ConfigError(
            f"{bad}the range [{value[0]}, {value[1]}] is empty: write [low, high] with low < high "
            "(to fix a value instead, pass it as an override: key=value)"
        )
    if kind.startswith("log_") and low <= 0:
        raise ConfigError(f"{bad}{kind} needs low > 0 (a log scale), got {value[0]}; use {kind[4:]} to include 0")
    step = spec.get("step")
    if step is not None:
        if kind.startswith("log_"):
            raise ConfigError(f"{bad}{kind} takes no step (Optuna samples log ranges continuously)")
        if not _number(step, integer) or float(step) <= 0:
            raise ConfigError(f"{bad}step must be a positive {'integer' if integer else 'number'}, got {step!r}")
        step = int(step) if integer else float(step)
    return Param(key, kind, low, high, step)


def load_space(path: str | Path) -> list[Param]:
    """The parameters of a space file, shapes checked; raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {path} not found; pass one with --space, e.g. configs/sweeps/debug.yaml")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{path} must map config keys to ranges; {EXAMPLE}")
    return [parse_param(str(key), spec, str(path)) for key, spec in doc.items()]


def check_space(params: list[Param], config: str | Path, overrides: list[str], where: str) -> Config:
    """Every parameter's key and sample values through the training config loader, on top of the base
    config and overrides. Returns the base config. Raises ConfigError naming the space entry."""
    base = load_config(config, overrides)
    keys = valid_keys()
    for p in params:
        if p.key in SET_BY_SWEEP:
            raise ConfigError(f"{where}: {p.key} is set by the sweep for each trial and cannot be searched")
        for value in p.samples():
            try:
                load_config(config, [*overrides, f"{p.key}={json.dumps(value)}"])
            except ConfigError as e:
                if ".".join(p.key.split(".")[:2]) not in keys:  # the key itself: the training CLI's message
                    raise ConfigError(f"{where}: {e}") from None
                raise ConfigError(f"{where}: {p.key}: {p.kind} value {value!r} cannot train: {e}") from None
    return base
