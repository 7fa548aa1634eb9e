"""`python -m eval.plot RUN_DIR [RUN_DIR ...] [--out loss.png]`: loss curves of training runs.

Reads each run's metrics.jsonl (written by `python -m train`): train loss at every log step, val loss
at every evaluation, the learning rate. Writes one PNG (default RUN_DIR/loss.png for one run,
./loss.png for several): train and val loss against step (left axis, log scale optional) and the
learning rate (right panel). Uses matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from eval.cli import UsageError, run


class PlotError(UsageError):
    """A run directory without metrics; the message says what is missing."""


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, v)], "val_loss": [...], "lr": [...]} from RUN/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found: pass a run directory written by `python -m train`")
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "val_loss": [], "lr": []}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        for key, points in series.items():
            v = rec.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and "step" in rec:
                points.append((int(rec["step"]), float(v)))
    if not series["loss"] and not series["val_loss"]:
        raise PlotError(f"{path} has no loss records yet")
    return series


def plot(run_dirs: list[Path], out: Path, log_y: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), read_metrics(Path(d))) for d in run_dirs]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run_dir, s) in enumerate(runs):
        c = colors[i % len(colors)]
        name = run_dir.name if len(runs) > 1 else ""
        if s["loss"]:
            steps, vals = zip(*s["loss"], strict=True)
            ax.plot(steps, vals, color=c, alpha=0.8, linewidth=1, label=f"{name} train".strip())
        if s["val_loss"]:
            steps, vals = zip(*s["val_loss"], strict=True)
            best = min(vals)
            ax.plot(
                steps,
                vals,
                color=c,
                marker="o",
                markersize=3,
                linestyle="--",
                label=f"{name} val (best {best:.3f})".strip(),
            )
        if s["lr"]:
            steps, vals = zip(*s["lr"], strict=True)
            ax_lr.plot(steps, vals, color=c, label=name or None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("loss" if len(runs) > 1 else f"{runs[0][0]}: loss")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/loss.png, or ./loss.png for several runs)")
    ap.add_argument("--log-y", action="store_true", help="logarithmic loss axis")
    args = ap.parse_args(argv)
    out = args.out or (args.run_dirs[0] / "loss.png" if len(args.run_dirs) == 1 else Path("loss.png"))
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; pass a .png path")
    print(f"wrote {plot(args.run_dirs, out, args.log_y)}")


if __name__ == "__main__":
    sys.exit(run(main))
