"""The saved confusion matrix of a run as a row-normalised heat map with class names.

    python scripts/confusion_matrix.py outputs/<run>                  # training's metrics.json
    python scripts/confusion_matrix.py outputs/<run> --eval msc_crf   # eval_msc_crf.json
    python scripts/confusion_matrix.py outputs/<run> --out cm.png

Row g, column p: the share of the pixels of ground-truth class g predicted as p (each row sums
to 1; a class without ground-truth pixels is an empty row), so the diagonal is each class's
accuracy and a bright off-diagonal cell is a confusion. Written to
``<run>/confusion_matrix[_<eval>].png`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def load(run: Path, eval_name: str | None) -> tuple[np.ndarray, list[str], str]:
    """(matrix[gt, pred], class names, the file they came from)."""
    path = run / ("metrics.json" if eval_name is None else f"eval_{eval_name}.json")
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (a run folder that has evaluated, or "
                         f"--eval <name> of a segtrain.evaluate output)")
    data = json.loads(path.read_text())
    if "confusion_matrix" not in data or "class_names" not in data:
        raise SystemExit(f"error: {path} holds no confusion_matrix and class_names")
    return np.array(data["confusion_matrix"], dtype=np.int64), list(data["class_names"]), \
        str(path)


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum; rows without pixels stay 0."""
    totals = matrix.sum(1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def plot(matrix: np.ndarray, names: list[str], title: str, out: Path) -> Path:
    shares = row_normalised(matrix)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    if len(names) <= 25:  # the shares in the cells while they stay readable
        for g in range(len(names)):
            for p in range(len(names)):
                if shares[g, p] >= 0.005:
                    ax.text(p, g, f"{100 * shares[g, p]:.0f}", ha="center", va="center",
                            fontsize=6, color="white" if shares[g, p] < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row's pixels")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--eval", default=None, help="eval_<name>.json instead of metrics.json")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    matrix, names, source = load(args.run, args.eval)
    if matrix.shape != (len(names), len(names)):
        print(f"error: {source}: a {matrix.shape} matrix for {len(names)} classes",
              file=sys.stderr)
        return 1
    suffix = "" if args.eval is None else f"_{args.eval}"
    out = args.out or args.run / f"confusion_matrix{suffix}.png"
    print(plot(matrix, names, f"{source} (rows: ground truth, normalised)", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
