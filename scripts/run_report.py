"""Markdown report of finished runs, read from their run folders: the command, the machine,
the wall time, the final validation scores and the per-class IoU side by side.

    python scripts/run_report.py outputs/camvid/run_a outputs/camvid/run_b > report.md

Everything comes from the folders: the command from ``.hydra/overrides.yaml``, the wall time
from the first and last time stamps of ``train.log`` (start-up, training and every
evaluation, as the user waits for them), the scores from ``metrics.json`` (the last
evaluation; a run whose ``metrics.json`` says it is unfinished is marked so). docs/results.md
is this script's output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import yaml

from segtrain.eval.metrics import percent

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]")


def wall_minutes(run: Path) -> float | None:
    """Minutes between the first and the last time stamp of ``train.log``."""
    log = run / "train.log"
    if not log.is_file():
        return None
    stamps = [m.group(1) for line in log.read_text().splitlines() if (m := STAMP.match(line))]
    if len(stamps) < 2:
        return None
    first, last = (datetime.datetime.fromisoformat(s) for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds() / 60


def command(run: Path) -> str:
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    keep = [o for o in overrides if not o.startswith(("hydra.", "trainer.num_workers"))]
    return "python -m segtrain " + " ".join(keep)


def load(run: Path) -> dict:
    path = run / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{run}: no metrics.json (the run never evaluated)")
    return json.loads(path.read_text())


def status(run: Path, metrics: dict) -> str:
    """``finished`` from metrics.json, else (older runs) the last evaluation at max_iters."""
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    max_iters = config["trainer"]["max_iters"]
    it = metrics["iteration"]
    if metrics.get("finished", it >= max_iters):
        return f"{it} of {max_iters}"
    return f"unfinished: {metrics.get('status', 'stopped')} at {it} of {max_iters}"


def report(runs: list[Path], names: list[str]) -> str:
    metrics = [load(r) for r in runs]
    lines = [f"Machine: {platform.machine()}, {platform.system()}, "
             f"{len(os.sched_getaffinity(0))} CPU cores visible to this script.", ""]
    lines += ["| run | command | wall time | iterations | val mIoU | global acc | class avg acc |",
              "|---|---|---:|---|---:|---:|---:|"]
    for name, run, m in zip(names, runs, metrics):
        minutes = wall_minutes(run)
        wall = "n/a" if minutes is None else f"{minutes:.0f} min"
        scores = " | ".join(percent(m[k]) for k in ("miou", "pixel_acc", "mean_acc"))
        lines.append(f"| {name} | `{command(run)}` | {wall} | {status(run, m)} | {scores} |")
    classes = metrics[0]["class_names"]
    lines += ["", "Per-class IoU (%) at the last evaluation:", "",
              "| class | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for c, cls in enumerate(classes):
        lines.append(f"| {cls} | " + " | ".join(percent(m["iou"][c]) for m in metrics) + " |")
    lines += ["", "Validation mIoU (%) at each evaluation:", "",
              "| iteration | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    iterations = sorted({h["iteration"] for m in metrics for h in m.get("history", [])})
    for it in iterations:
        row = []
        for m in metrics:
            hit = [h for h in m.get("history", []) if h["iteration"] == it]
            row.append(percent(hit[0]["miou"]) if hit else "")
        lines.append(f"| {it} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--names", nargs="+", help="column names (default: folder names)")
    args = parser.parse_args()
    names = args.names or [r.name for r in args.runs]
    if len(names) != len(args.runs):
        raise SystemExit(f"--names has {len(names)} entries for {len(args.runs)} runs")
    sys.stdout.write(report(args.runs, names))


if __name__ == "__main__":
    main()
