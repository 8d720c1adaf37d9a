"""scripts/plot_runs.py on two tiny runs of a real sweep: the curves come from the run
folders (metrics.json history, TensorBoard, train.log) and the PNG is written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.cli_in_process import run_module
from tests.conftest import REPO, TINY

sys.path.insert(0, str(REPO / "scripts"))
import plot_runs  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("plot") / "multirun"
    proc = run_module("segtrain", "-m", "lr=poly,step", *TINY, f"hydra.sweep.dir={root}",
                      "hydra.sweep.subdir=${hydra.job.num}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_curves_come_from_the_run_folders(runs, tmp_path):
    run = runs[0]
    history = json.loads((run / "metrics.json").read_text())["history"]
    its, miou = plot_runs.miou_curve(run)
    assert its == [3, 6]  # TINY: eval_interval 3, max_iters 6
    assert miou == pytest.approx([100 * h["miou"] for h in history])
    steps, loss = plot_runs.loss_curve(run)
    assert steps == [2, 4, 6] and all(np.isfinite(loss))  # TINY: log_interval 2
    # without tb/ the same points come from train.log (printed with 4 decimals)
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("tb"))
    log_steps, log_loss = plot_runs.loss_curve(bare)
    assert log_steps == steps and log_loss == pytest.approx(loss, abs=1e-4)
    assert plot_runs.labels(runs) == ["lr=poly", "lr=step"]


def test_plot_writes_one_png_with_both_runs(runs, tmp_path):
    out = tmp_path / "fig" / "curves.png"
    assert plot_runs.main([*map(str, runs), "--out", str(out), "--title", "poly vs step"]) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (504, 1320, 3)  # 11 x 4.2 inches at 120 dpi
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # lines and text, not blank


def test_no_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no run folder"):
        plot_runs.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


def _run_folder(path: Path, overrides: list[str], batch_size: int, lr: str) -> Path:
    """A run folder's .hydra/ as python -m segtrain writes it (no training needed)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"trainer": {"batch_size": batch_size}, "optim": {"lr": 0.001}}))
    (path / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"lr": lr, "model": "unet"}}}}))
    return path


def test_runs_are_labelled_by_the_settings_that_differ_or_default(tmp_path):
    default = _run_folder(tmp_path / "a", [], 8, "poly")
    step = _run_folder(tmp_path / "b", ["lr=step", "trainer.batch_size=16"], 16, "step")
    same = _run_folder(tmp_path / "c", ["lr=poly", "model=unet"], 8, "poly")  # as the default
    assert plot_runs.labels([default, step]) == ["default", "lr=step trainer.batch_size=16"]
    # lr=poly and model=unet change nothing here: the two runs are the same settings
    assert plot_runs.labels([default, step, same]) == \
        ["default (a)", "lr=step trainer.batch_size=16", "default (c)"]
