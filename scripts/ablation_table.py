"""Turn a Hydra sweep folder into a paper-style table.

    python scripts/ablation_table.py outputs/multirun/<date>/<time>
    python scripts/ablation_table.py <sweep> --paper paper.yaml --format csv

Each run folder of the sweep holds ``.hydra/overrides.yaml`` and ``metrics.json``. The table
has one row per run, one column per override that differs between runs, then mIoU, pixel
accuracy, mean accuracy and the best mIoU seen during training (in percent). ``--paper``
takes a YAML mapping from a row's label (its varying overrides joined by ", ", e.g.
``model.head=aspp_l``) to the paper's mIoU, shown beside ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

METRICS = (("mIoU", "miou"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_acc"),
           ("best mIoU", "best_miou"))


def collect(sweep: Path) -> list[dict]:
    runs = []
    for overrides_file in sorted(sweep.glob("*/.hydra/overrides.yaml")):
        run = overrides_file.parent.parent
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text())
                         if "=" in o)
        metrics_file = run / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        runs.append({"run": run.name, "overrides": overrides, "metrics": metrics})
    if not runs:
        raise SystemExit(f"{sweep}: no run folders with .hydra/overrides.yaml found; pass the "
                         f"sweep folder Hydra printed (outputs/multirun/<date>/<time>)")
    return runs


def table(runs: list[dict], paper: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for r in runs for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1] or keys
    header = varying + [name for name, _ in METRICS] + (["paper mIoU"] if paper else [])
    rows = []
    for r in runs:
        label = ", ".join(f"{k}={r['overrides'].get(k, '')}" for k in varying)
        row = [r["overrides"].get(k, "") for k in varying]
        for _, key in METRICS:
            v = r["metrics"].get(key)
            row.append("n/a" if v is None else f"{100 * v:.2f}")
        if paper:
            row.append(f"{paper[label]:.2f}" if label in paper else "")
        rows.append(row)
    return header, rows


def render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        return "\n".join(",".join(r) for r in [header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the multirun folder of one sweep")
    parser.add_argument("--paper", type=Path, help="YAML: row label -> the paper's mIoU")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        raise SystemExit(f"sweep folder not found: {args.sweep}")
    paper = yaml.safe_load(args.paper.read_text()) if args.paper else {}
    print(render(*table(collect(args.sweep), paper or {}), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
