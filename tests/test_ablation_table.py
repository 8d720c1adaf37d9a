"""scripts/ablation_table.py on a real two-run sweep through Hydra's basic launcher: the
experiment named in the runs' overrides finds its paper file, rows match by override, and
failed or unfinished runs show as such."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONF_DIR, REPO, TINY

sys.path.insert(0, str(REPO / "scripts"))
import ablation_table  # noqa: E402

PAPER = {"rows": [
    {"overrides": {"lr": "poly"}, "value": 63.42, "metric": "miou", "table": "Table 2",
     "paper": "Chen et al., TPAMI 2017", "confirmed": "test"},
    {"overrides": {"lr": "step"}, "value": 62.25, "metric": "miou", "table": "Table 2",
     "paper": "Chen et al., TPAMI 2017", "confirmed": "test"},
    {"overrides": {"lr": "poly"}, "value": 90.0, "metric": "pixel_acc", "table": "Table 9",
     "paper": "Someone", "confirmed": "test"},
    {"overrides": {"lr": "cosine"}, "value": 50.0, "metric": "miou", "table": "Table 2",
     "paper": "Chen et al., TPAMI 2017", "confirmed": "test"},
]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """``python -m segtrain -m experiment=unet lr=poly,step`` with tiny settings."""
    root = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "segtrain", "-m", "experiment=unet", "lr=poly,step",
            *TINY, "model.base_channels=4", "trainer.batch_size=2",
            f"hydra.sweep.dir={root / 'multirun'}",
            # the default subdir (all overrides) would exceed the 255-byte file-name limit
            "hydra.sweep.subdir=${hydra.job.num}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "multirun"


def _paper_dir(tmp_path: Path) -> Path:
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "unet.yml").write_text(yaml.safe_dump(PAPER))
    return tmp_path / "paper"


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_table_of_a_real_sweep(sweep, tmp_path):
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    assert ablation_table.main([str(sweep), "--paper-dir", str(_paper_dir(tmp_path))]) == 0
    rows = _rows((sweep / "ablation_table.csv").read_text())
    assert (sweep / "ablation_table.md").read_text().startswith("| run | lr | status |")
    by_lr = {r["lr"]: r for r in rows if r["status"] == "ok"}
    assert set(by_lr) == {"poly", "step"}
    for lr, paper in (("poly", 63.42), ("step", 62.25)):
        run = sweep / ("0" if lr == "poly" else "1")
        ours = 100 * json.loads((run / "metrics.json").read_text())["miou"]
        row = by_lr[lr]
        assert float(row["mIoU"]) == pytest.approx(ours, abs=0.005)
        assert float(row["paper mIoU"]) == paper
        assert float(row["diff mIoU"]) == pytest.approx(ours - paper, abs=0.011)
    # a metric only one row reports gets its columns, empty where the paper has no number
    assert float(by_lr["poly"]["paper pixel acc"]) == 90.0
    assert by_lr["step"]["paper pixel acc"] == "" and by_lr["step"]["pixel acc"] != ""
    assert "Chen et al., TPAMI 2017, Table 2" in by_lr["step"]["paper source"]
    # the paper row no run reproduces is listed, not dropped
    missing = [r for r in rows if r["status"] == "not run"]
    assert [(r["run"], r["paper mIoU"]) for r in missing] == [("lr=cosine", "50.00")]


def test_failed_and_unfinished_runs_show_as_such(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    poly, step = sorted(p for p in copy.iterdir() if p.is_dir())
    (poly / "metrics.json").unlink()  # crashed before its first evaluation
    bad = copy / "2"
    shutil.copytree(step, bad)
    metrics = json.loads((step / "metrics.json").read_text())
    metrics["iteration"] = 3  # an evaluation before trainer.max_iters=6: stopped early
    (step / "metrics.json").write_text(json.dumps(metrics))
    flagged = {**metrics, "iteration": 6, "finished": False}  # i9's explicit marker
    (bad / "metrics.json").write_text(json.dumps(flagged))
    # Hydra folders of segtrain.evaluate inside a run are not runs of the sweep
    (poly / "eval" / "x_msc" / ".hydra").mkdir(parents=True)
    shutil.copy(step / ".hydra" / "overrides.yaml", poly / "eval" / "x_msc" / ".hydra")
    header, rows = ablation_table.table(ablation_table.collect(copy), _paper_dir(tmp_path))
    assert len([r for r in rows if r[header.index("status")] != "not run"]) == 3
    status = {r[0]: r[header.index("status")] for r in rows}
    assert status[poly.name] == "failed (no metrics.json)"
    assert status[step.name] == "unfinished (iteration 3 of 6)"
    assert status[bad.name] == "unfinished (iteration 6 of 6)"
    assert rows[0][header.index("mIoU")] == "n/a"


def test_every_paper_file_names_an_experiment_and_confirms_its_rows():
    paper_dir = CONF_DIR / "experiment" / "paper"
    for path in paper_dir.glob("*.yml"):
        data = yaml.safe_load(path.read_text())
        for row in data.get("rows") or []:
            assert {"overrides", "value", "metric", "table", "paper", "confirmed"} <= set(row), \
                f"{path.name}: {row}"
            assert row["metric"] in ("miou", "pixel_acc", "mean_acc", "fwiou"), path.name
            assert 0 < float(row["value"]) <= 100, path.name
    # every paper file belongs to an experiment config
    experiments = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert {p.stem for p in paper_dir.glob("*.yml")} <= experiments
    # every paper protocol has its file; camvid_* are our own CPU-budget runs, no paper's
    papers = {e for e in experiments if not e.startswith("camvid_")}
    assert papers <= {p.stem for p in paper_dir.glob("*.yml")}
