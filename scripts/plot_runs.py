"""Learning curves of one or more runs in one PNG: validation mIoU and training loss against
iterations, the runs overlaid.

    python scripts/plot_runs.py outputs/<run> --out curves.png
    python scripts/plot_runs.py outputs/multirun/<date>/<time>/* --out poly_vs_step.png

Everything is read from the run folders: the mIoU history from ``metrics.json`` (one point per
evaluation), the training loss (``total``) from the TensorBoard event files in ``tb/``, or
from ``train.log`` when there are none. A run's legend is the overrides that differ between
the runs plotted (``lr=poly``), else its folder name.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

LOSS_TAG = "train/loss/total"
LOG_LINE = re.compile(r"iter (\d+)/\d+\s+.*?\btotal ([0-9.eE+-]+|nan|inf)")


def miou_curve(run: Path) -> tuple[list[int], list[float]]:
    """(iterations, mIoU in percent) of every evaluation in ``metrics.json``."""
    path = run / "metrics.json"
    if not path.is_file():
        return [], []
    history = json.loads(path.read_text()).get("history", [])
    points = [(h["iteration"], 100 * h["miou"]) for h in history if h.get("miou") is not None]
    return [p[0] for p in points], [p[1] for p in points]


def loss_curve(run: Path) -> tuple[list[int], list[float]]:
    """(iterations, total training loss) from TensorBoard, else from train.log."""
    if (run / "tb").is_dir():
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        if LOSS_TAG in events.Tags().get("scalars", []):
            scalars = sorted({s.step: s.value for s in events.Scalars(LOSS_TAG)}.items())
            return [s for s, _ in scalars], [v for _, v in scalars]
    log = run / "train.log"
    if not log.is_file():
        return [], []
    points = {int(m[1]): float(m[2]) for m in LOG_LINE.finditer(log.read_text())}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def labels(runs: list[Path]) -> list[str]:
    """The overrides that differ between the runs, else the folder names."""
    overrides = []
    for run in runs:
        path = run / ".hydra" / "overrides.yaml"
        items = yaml.safe_load(path.read_text()) if path.is_file() else []
        overrides.append(dict(o.split("=", 1) for o in items or [] if "=" in o))
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    if not varying or len(runs) == 1:
        return [run.name for run in runs]
    return [" ".join(f"{k}={o.get(k, '-')}" for k in varying) for o in overrides]


def plot(runs: list[Path], out: Path, title: str | None = None) -> Path:
    fig, (ax_miou, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, label in zip(runs, labels(runs)):
        its, miou = miou_curve(run)
        line = ax_miou.plot(its, miou, marker="o", markersize=3, label=label)[0]
        steps, loss = loss_curve(run)
        ax_loss.plot(steps, loss, color=line.get_color(), label=label)
    ax_miou.set(xlabel="iteration", ylabel="val mIoU (%)", title="validation mIoU")
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training loss (total)")
    for ax in (ax_miou, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    runs = [r for r in args.runs if r.is_dir()]
    empty = [r for r in runs if not miou_curve(r)[0] and not loss_curve(r)[0]]
    if not runs or len(empty) == len(runs):
        raise SystemExit("no run folder with metrics.json, tb/ or train.log among: "
                         + " ".join(map(str, args.runs)))
    for run in empty:
        print(f"note: {run} has no metrics.json history and no training loss yet",
              file=sys.stderr)
    print(plot(runs, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
