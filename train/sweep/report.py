"""What a sweep leaves: the table of the best trials, parameter importances, the plots, best.yaml.

All of it is written to DIR/STUDY/ (summary.txt, sweep.png, best.yaml) and printed, from the study in
the storage alone, so it is the same whichever worker or machine ran the trials.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import yaml

from model.files import write_text_atomic
from train.config import load_config


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(sweep, study) -> list[str]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    lines = [
        f"study {study.study_name}: {len(trials)} trials ({count[TrialState.COMPLETE]} complete, "
        f"{count[TrialState.PRUNED]} pruned, {count[TrialState.FAIL]} failed, {count[TrialState.RUNNING]} running) "
        f"| objective {sweep.args.objective} ({sweep.direction})"
    ]
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE),
        key=lambda t: t.value if sweep.direction == "minimize" else -t.value,
    )
    keys = [p.key for p in sweep.params]
    head = ["rank", "trial", sweep.args.objective, "steps", *keys]
    rows = [
        [str(i), str(t.number), f"{t.value:.4f}", str(t.user_attrs.get("steps", ""))]
        + [_fmt(t.params.get(k)) for k in keys]
        for i, t in enumerate(done[: sweep.args.top], 1)
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    if pruned:
        lines.append("pruned: " + ", ".join(f"trial {t.number} at step {t.last_step}" for t in pruned))
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if failed:
        why = [f"trial {t.number} ({t.user_attrs.get('failed_because', '?')})" for t in failed]
        lines.append("failed: " + "; ".join(why))
    return lines


def importances(sweep, study) -> str:
    """fANOVA importances (Hutter et al. 2014; Optuna's default evaluator) over the complete trials."""
    import optuna

    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=sweep.args.seed)
        imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except ImportError as e:
        return f"parameter importances: not available ({e}; pip install scikit-learn, or -e '.[sweep]')"
    except (ValueError, RuntimeError) as e:
        return f"parameter importances: not available ({e})"
    return "parameter importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items())


def _render(ax) -> np.ndarray:
    fig = ax.figure if not isinstance(ax, np.ndarray) else ax.flat[0].figure
    fig.set_size_inches(9, 4)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return image


def plot(sweep, study, path: Path) -> str:
    """One PNG: optimisation history, slice and (with 2+ parameters) parallel-coordinate plots, from
    optuna.visualization.matplotlib, stacked top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm

    panels = [ovm.plot_optimization_history, ovm.plot_slice]
    if len(sweep.params) > 1:
        panels.append(ovm.plot_parallel_coordinate)
    images = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for panel in panels:
            try:
                images.append(_render(panel(study)))
            except (ValueError, RuntimeError) as e:
                return f"plot: not drawn ({panel.__name__}: {e})"
    width = max(i.shape[1] for i in images)
    padded = [np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=255) for i in images]
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.concatenate(padded, axis=0))
    return f"plot: {path}"


def best_yaml(sweep, study, path: Path) -> str:
    """The best trial's complete config, to train from scratch in DIR/STUDY/best."""
    try:
        best = study.best_trial
    except ValueError:
        return "best.yaml: no complete trial yet"
    source = Path(best.user_attrs["run_dir"]) / "config.yaml"
    cfg = yaml.safe_load(source.read_text())
    cfg["train"]["run_dir"] = str(sweep.dir / "best")
    cfg["train"]["resume"] = "auto"
    cfg["logging"]["progress_bar"] = sweep.base.logging.progress_bar
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    header = (
        f"# The best trial of sweep {study.study_name}: trial {best.number} ({shown}), "
        f"{sweep.args.objective} {best.value:.4f}.\n# Train it from scratch: python -m train --config {path}\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=120))
    load_config(path)  # what we wrote must load
    return f"best config: {path} (trial {best.number}; python -m train --config {path})"


def write_report(sweep, study) -> None:
    lines = table(sweep, study)
    lines.append(importances(sweep, study))
    lines.append(plot(sweep, study, sweep.dir / "sweep.png"))
    lines.append(best_yaml(sweep, study, sweep.dir / "best.yaml"))
    text = "\n".join(lines)
    write_text_atomic(sweep.dir / "summary.txt", text + "\n")
    print(text, flush=True)
