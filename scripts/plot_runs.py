"""Learning curves of one or more runs in one PNG: validation mIoU and training loss against
iterations, the runs overlaid.

    python scripts/plot_runs.py outputs/<run> --out curves.png
    python scripts/plot_runs.py outputs/multirun/<date>/<time>/* --out poly_vs_step.png

Everything is read from the run folders: the mIoU history from ``metrics.json`` (one point per
evaluation), the training loss (``total``) from the TensorBoard event files in ``tb/``, or
from ``train.log`` when there are none. A run's legend is the settings that differ between
the runs plotted (``lr=step``), ``default`` for a run with the default settings, with the
folder name where two runs share their settings.
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


def _saved(run: Path, name: str) -> dict:
    path = run / ".hydra" / name
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def settings(run: Path, keys: set[str]) -> dict[str, str]:
    """The value of each of ``keys`` (override keys: a group's or a config key's) in ``run``:
    its override, else the option or value its saved config holds."""
    overrides = dict(o.split("=", 1) for o in _saved(run, "overrides.yaml") or [] if "=" in o)
    config = _saved(run, "config.yaml")
    choices = _saved(run, "hydra.yaml").get("hydra", {}).get("runtime", {}).get("choices", {})
    values = {}
    for key in keys:
        if key in overrides:
            values[key] = overrides[key]
        elif key in choices:
            values[key] = str(choices[key])
        else:
            node = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values[key] = "null" if node is None else str(node)
    return values


def labels(runs: list[Path]) -> list[str]:
    """Each run's settings that differ between the runs (their overrides, compared by the
    value each run used), ``default`` for a run with the defaults' settings; the folder name
    added where two runs share settings, and for a single run."""
    if len(runs) == 1:
        return [runs[0].name]
    keys = {o.split("=", 1)[0].lstrip("+~") for run in runs
            for o in _saved(run, "overrides.yaml") or [] if "=" in o}
    values = [settings(run, keys) for run in runs]
    varying = sorted(k for k in keys if len({v[k] for v in values}) > 1)
    defaults = [v for run, v in zip(runs, values) if not _saved(run, "overrides.yaml")]
    base = defaults[0] if defaults else {}
    names = []
    for v in values:
        own = [f"{k}={v[k]}" for k in varying if v[k] != base.get(k)]
        names.append(" ".join(own) or "default")
    return [f"{name} ({run.name})" if names.count(name) > 1 else name
            for name, run in zip(names, runs)]


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
