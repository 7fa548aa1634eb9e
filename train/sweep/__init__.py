"""Hyperparameter sweeps on Optuna (`python -m train.sweep`; docs/sweeps.md).

__main__.py  `python -m train.sweep`: the workers, each trial an ordinary training run, the report
study.py     the study's storage and pruner, shared by the workers and a trial under torchrun
trial.py     one trial as a training run: the pruning callback; `-m train.sweep.trial` under torchrun
space.py     the search space file: parameters, their kinds and ranges, checked against the config
report.py    the best trials, parameter importances, plots and the best trial's config
"""
