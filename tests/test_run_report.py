"""scripts/run_report.py: the Markdown of docs/results.md, read from run folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fake_run(root: Path, name: str, iteration: int, miou: float, finished: bool | None) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        "- experiment=demo\n- lr=poly\n- trainer.num_workers=1\n- hydra.run.dir=x\n")
    (run / ".hydra" / "config.yaml").write_text("trainer:\n  max_iters: 100\n")
    (run / "train.log").write_text(
        "[2026-11-22 04:00:00,100][segtrain][INFO] - data: ...\n"
        "[2026-11-22 04:42:30,900][segtrain][INFO] - final: ...\n")
    metrics = {"iteration": iteration, "miou": miou, "pixel_acc": 0.9, "mean_acc": 0.5,
               "class_names": ["road", "sky"], "iou": [0.8, None],
               "history": [{"iteration": 50, "miou": miou / 2},
                           {"iteration": iteration, "miou": miou}]}
    if finished is not None:
        metrics["finished"] = finished
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_report_reads_command_time_scores_and_status(tmp_path):
    done = fake_run(tmp_path, "a", 100, 0.5, None)
    stopped = fake_run(tmp_path, "b", 60, 0.25, False)
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "run_report.py"), str(done),
                          str(stopped), "--names", "poly", "step"],
                         capture_output=True, text=True, check=True)
    out = res.stdout
    # the command without the launcher plumbing, 42.5 minutes of log, the last evaluation
    assert "| poly | `python -m segtrain experiment=demo lr=poly` | 42 min | 100 of 100 | " \
           "50.00 | 90.00 | 50.00 |" in out
    assert "| step |" in out and "unfinished: stopped at 60 of 100 | 25.00 |" in out
    assert "| road | 80.00 | 80.00 |" in out and "| sky | n/a | n/a |" in out
    assert "| 50 | 25.00 | 12.50 |" in out
