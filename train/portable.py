"""The strategy-neutral ("portable") training state: the bridge between checkpoints of different
strategies, world sizes and ZeRO stages (docs/checkpoints.md).

One form, keyed by parameter name (the bare GPT's `named_parameters()`: a tied lm_head is the token
table's entry), holding
    params        name -> fp32 weight (the full tensor; the optimizer's master copy where there is one)
    state         name -> {state key -> tensor}: generic over keys (AdamW's exp_avg / exp_avg_sq /
                  step, Muon's momentum_buffer, ...)
    param_groups  the optimizer's groups in order: their hyperparameters and their parameters' names

On disk (a directory; the format `python -m train.consolidate CKPT --neutral OUT` writes):
    neutral.json            {"format": "gptrain-neutral", "version": 1, "step": ..., "source": {...},
                            "param_groups": [{hyperparameters..., "params": [names]}]}
    weights.safetensors     name -> fp32 tensor
    optimizer.safetensors   "NAME::KEY" -> tensor (e.g. "transformer.h.0.attn.c_attn.weight::exp_avg";
                            a 0-dim tensor for a scalar such as `step`)
safetensors and JSON only: reading it never runs pickled code.

Producers read a saved checkpoint offline, in one process (rank 0 at resume, or train.consolidate):
    none / ddp   model/ (the artifact) + the index-keyed optimizer state in train_state.pt, named by
                 the parameter names saved beside it
    fsdp         the DCP shards of state/, read with torch.distributed.checkpoint.format_utils
    deepspeed    DeepSpeed's own universal-checkpoint converter (deepspeed.checkpoint.ds_to_universal)
                 turns the ZeRO partitions into one folder per parameter (fp32.pt, exp_avg.pt, ...)
Consumers are the strategies' load_portable() (train/strategies/*): torch's
get_/set_optimizer_state_dict(full_state_dict=True) for none / ddp / fsdp, DeepSpeed's tensor-fragment
API (safe_set_full_fp32_param / safe_set_full_optimizer_state) for ZeRO 1/2/3.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.io import MODEL_DIR, clean_state_dict, load_state
from train.errors import TrainError

FORMAT, VERSION = "gptrain-neutral", 1
META, WEIGHTS, OPTIMIZER = "neutral.json", "weights.safetensors", "optimizer.safetensors"
SEP = "::"


class PortableError(TrainError):
    """A checkpoint that cannot be turned into (or read as) the neutral form; says why."""


@dataclass
class Portable:
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> full fp32 tensor
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {key -> tensor}
    param_groups: list[dict] = field(default_factory=list)  # hyperparameters + "params": [names]
    step: int = 0
    source: dict = field(default_factory=dict)  # strategy / world_size / zero_stage that wrote it

    def optimizer_state_dict(self) -> dict:
        """torch's full, name-keyed optimizer state dict (what get_optimizer_state_dict(full_state_dict=True)
        returns and set_optimizer_state_dict takes)."""
        return {
            "state": {n: dict(s) for n, s in self.state.items()},
            "param_groups": [dict(g, params=list(g["params"])) for g in self.param_groups],
        }

    # ------------------------------------------------------------------ disk
    def save(self, out: Path) -> Path:
        """Write the three files into the (existing, empty) directory `out`."""
        out = Path(out)
        save_file({n: t.detach().float().contiguous().cpu() for n, t in self.params.items()}, out / WEIGHTS)
        flat = {
            f"{n}{SEP}{k}": (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().contiguous().cpu()
            for n, s in self.state.items()
            for k, v in s.items()
        }
        save_file(flat, out / OPTIMIZER)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(self.step),
            "source": self.source,
            "param_groups": [_jsonable(g) for g in self.param_groups],
        }
        (out / META).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, path: Path) -> Portable:
        path = Path(path)
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PortableError(f"{path} is not a neutral training state ({e})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise PortableError(f"{path / META}: not format {FORMAT} version {VERSION}")
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in load_file(path / OPTIMIZER).items():
            name, _, k = key.rpartition(SEP)
            state.setdefault(name, {})[k] = t
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
        return cls(load_file(path / WEIGHTS), state, groups, meta["step"], meta.get("source", {}))


def _jsonable(group: dict) -> dict:
    out = {}
    for k, v in group.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


# ----------------------------------------------------------------------------- producers


def from_checkpoint(ckpt: Path, state_dir: Path, saved, work: Path) -> Portable:
    """The neutral form of checkpoint `ckpt` (its TrainState `saved`, its strategy's `state_dir`);
    `work` is an empty scratch directory (DeepSpeed's converter writes there)."""
    strategy = saved.strategy
    source = {"strategy": strategy, "world_size": saved.world_size, "step": saved.step}
    if strategy == "deepspeed":
        p = _from_deepspeed(state_dir, work)
        source["zero_stage"] = saved.strategy_state.get("zero_stage")
    elif "optimizer" in saved.strategy_state:  # the native layout of earlier versions: no DCP shards
        p = _from_local(ckpt, saved.strategy_state)
    else:
        p = _from_dcp(state_dir, work)
    p.source, p.step = source, saved.step
    return p


def _from_local(ckpt: Path, saved: dict) -> Portable:
    """none / ddp: the artifact's weights + the index-keyed torch optimizer state, named by
    saved['param_names'] (one list per group, in the optimizer's order)."""
    names = saved.get("param_names")
    if names is None:
        raise PortableError(
            f"{ckpt} was written before checkpoints carried parameter names; resume it with "
            "parallel.strategy=none or ddp, or start from its weights with train.init_from"
        )
    _, weights, _ = load_state(ckpt / MODEL_DIR)
    osd = saved["optimizer"]
    index = {
        i: n for g, gn in zip(osd["param_groups"], names, strict=True) for i, n in zip(g["params"], gn, strict=True)
    }
    groups = [dict(g, params=list(gn)) for g, gn in zip(osd["param_groups"], names, strict=True)]
    state = {index[i]: dict(s) for i, s in osd["state"].items()}
    params = {n: weights[n].float() for gn in names for n in gn}
    return Portable(params, state, groups)


def _from_dcp(state_dir: Path, work: Path) -> Portable:
    """fsdp: every rank's DCP shard of {"model", "optim"} (get_state_dict's fully-qualified names),
    merged into one torch.save file by DCP's own offline converter, then read weights_only."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (state_dir / ".metadata").is_file():
        raise PortableError(f"{state_dir} holds no DCP checkpoint (.metadata missing)")
    merged = work / "dcp.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp_to_torch_save(state_dir, merged)
    sd = torch.load(merged, map_location="cpu", weights_only=True)
    merged.unlink()
    model, optim = clean_state_dict(sd["model"]), sd["optim"]
    groups = [dict(g, params=[_clean(n) for n in g["params"]]) for g in optim["param_groups"]]
    state = {_clean(n): dict(s) for n, s in optim["state"].items()}
    params = {n: model[n].float() for g in groups for n in g["params"]}
    return Portable(params, state, groups)


def _clean(name: str) -> str:
    return next(iter(clean_state_dict({name: None})))


def _from_deepspeed(state_dir: Path, work: Path) -> Portable:
    """deepspeed: DeepSpeed's ds_to_universal merges the ZeRO partitions (any stage, any world
    size) into one folder per parameter, zero/NAME/{fp32,exp_avg,exp_avg_sq,...}.pt; the groups and
    shapes come from the engine's model-states file (param_shapes: one name -> shape dict per group)."""
    import argparse

    try:
        from deepspeed.checkpoint import ds_to_universal
    except ImportError as e:
        raise PortableError(f"reading a DeepSpeed checkpoint needs the deepspeed package ({e})") from None
    engine = state_dir / "engine"  # train/strategies/deepspeed.py's TAG
    model_files = sorted(engine.glob("*model_states.pt"))
    if not model_files:
        raise PortableError(f"{engine} holds no DeepSpeed checkpoint (no *model_states.pt)")
    universal = work / "ds" / "universal"  # the converter also writes a `latest_universal` beside it
    args = argparse.Namespace(
        input_folder=str(engine),
        output_folder=str(universal),
        num_extract_workers=1,  # in this process: no worker pool
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our engines do not set universal_checkpoint_info: an empty one fits
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    # DeepSpeed's own pickles (docs/checkpoints.md: state/ is as trusted as code)
    model_states = torch.load(model_files[0], map_location="cpu", weights_only=False)
    common = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    hyper = common.get("param_groups") or common["optimizer_state_dict"]["param_groups"]
    step = None
    if "optimizer_state_dict" in common:  # ZeRO-3 keeps the step with the flat groups
        step = common["optimizer_state_dict"]["state"][0].get("step")
    params, state, groups = {}, {}, []
    for shapes, h in zip(model_states["param_shapes"], hyper, strict=True):
        groups.append(dict(h, params=[_clean(n) for n in shapes]))
        for raw, shape in shapes.items():
            name, folder = _clean(raw), universal / "zero" / raw
            entry = {}
            for f in sorted(folder.glob("*.pt")):
                obj = torch.load(f, map_location="cpu", weights_only=True)
                t = obj["param"] if isinstance(obj, dict) else obj
                entry[f.stem] = t if f.stem == "step" else t.detach().reshape(shape).clone()
            params[name] = entry.pop("fp32").float()
            if "step" not in entry and step is not None:
                entry["step"] = torch.as_tensor(step).clone()
            state[name] = entry
    shutil.rmtree(universal.parent)
    return Portable(params, state, groups)
