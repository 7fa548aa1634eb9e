"""The Optuna pieces that the sweep's workers and a trial under torchrun share: the study's storage
and its pruner (train/sweep/__main__.py creates the study, train/sweep/trial.py re-attaches to it)."""

from __future__ import annotations

import warnings

PRUNERS = ("median", "hyperband", "halving", "none")


def make_storage(url: str):
    """An Optuna RDB storage with heartbeats (for trials of machines that die). SQLite waits for a
    busy database instead of failing at once, as several workers write to one file."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120)


def make_pruner(options: dict):
    """The pruner: `median` (Optuna's default), `hyperband` (Li et al. 2018), `halving` (asynchronous
    successive halving, Li et al. 2020), `none`. The resource of the last two is the training step."""
    import optuna

    name, startup, every = options["pruner"], options["startup"], options["eval_every"]
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=options["warmup"])
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=every, max_resource=options["max_steps"])
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=every)
    return optuna.pruners.NopPruner()
