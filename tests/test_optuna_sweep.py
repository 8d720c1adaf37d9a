"""Hyper-parameter search with hydra-optuna-sweeper (``hydra/sweeper=optuna_miou``): a real
4-trial search on the embedded dataset, failed and unfinished trials as Optuna failures (not
zeros), the direction check, the SLURM launcher under the sweeper, and the trial table of
scripts/ablation_table.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate

from segtrain.__main__ import check_sweep_direction
from segtrain.errors import ConfigError
from tests.conftest import CONF_DIR, REPO, TINY

sys.path.insert(0, str(REPO / "scripts"))
import ablation_table  # noqa: E402

SEARCH = ["hydra/sweeper=optuna_miou", "optim.lr=tag(log,interval(1e-4,1e-1))"]


def _hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True,
                       overrides=list(overrides))


@pytest.fixture(scope="module")
def search(tmp_path_factory) -> tuple[Path, str]:
    """``python -m segtrain -m hydra/sweeper=optuna_miou 'optim.lr=...'``, 4 tiny trials."""
    root = tmp_path_factory.mktemp("search") / "multirun"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "segtrain", "-m", *SEARCH, "hydra.sweeper.n_trials=4",
            *TINY, f"hydra.sweep.dir={root}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, proc.stdout + proc.stderr


def test_four_trial_search_finishes_and_reports_the_best(search):
    root, log = search
    trials = sorted(p.parent for p in root.glob("*/metrics.json"))
    assert [t.name for t in trials] == ["0", "1", "2", "3"]
    scores = {t.name: json.loads((t / "metrics.json").read_text()) for t in trials}
    assert all(m["finished"] for m in scores.values())
    results = yaml.safe_load((root / "optimization_results.yaml").read_text())
    # the sweeper maximised the final validation mIoU of the trials' own metrics.json
    assert results["best_value"] == max(m["miou"] for m in scores.values())
    lrs = [yaml.safe_load((t / ".hydra" / "overrides.yaml").read_text())[0] for t in trials]
    assert all(o.startswith("optim.lr=") for o in lrs)
    assert all(1e-4 <= float(o.split("=")[1]) <= 1e-1 for o in lrs)
    assert len(set(lrs)) == 4  # four different draws
    assert "Best value" in log


def test_trial_table_of_the_search(search, capsys):
    root, _ = search
    assert ablation_table.main([str(root)]) == 0  # optimization_results.yaml: the trial view
    rows = list(ablation_table.csv.DictReader(
        (root / "ablation_table.csv").read_text().splitlines()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    scores = [float(r["mIoU"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    best = yaml.safe_load((root / "optimization_results.yaml").read_text())
    marked = [r for r in rows if r["sweeper's best"] == "yes"]
    assert len(marked) == 1 and float(marked[0]["optim.lr"]) == best["best_params"]["optim.lr"]
    assert float(marked[0]["mIoU"]) == pytest.approx(100 * best["best_value"], abs=0.005)


def _fake_trial(run: Path, lr: str, metrics: dict | None) -> None:
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={lr}"]))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_iters": 10}}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))


def test_trial_table_sorts_by_score_and_puts_failures_last(tmp_path):
    _fake_trial(tmp_path / "0", "0.1", None)  # failed: no metrics.json
    _fake_trial(tmp_path / "1", "0.01", {"miou": 0.30, "iteration": 10, "finished": True})
    _fake_trial(tmp_path / "2", "0.001", {"miou": 0.90, "iteration": 4, "finished": False})
    _fake_trial(tmp_path / "3", "0.0001", {"miou": 0.50, "iteration": 10, "finished": True})
    header, body = ablation_table.search_table(ablation_table.collect(tmp_path),
                                               {"best_params": {"optim.lr": 0.0001}})
    rows = [dict(zip(header, line)) for line in body]
    assert [r["run"] for r in rows] == ["3", "1", "0", "2"]
    assert [r["rank"] for r in rows] == ["1", "2", "-", "-"]
    # an unfinished trial's partial mIoU (0.90) is not a score, as the sweeper saw it
    assert [r["mIoU"] for r in rows] == ["50.00", "30.00", "n/a", "n/a"]
    assert [r["sweeper's best"] for r in rows] == ["yes", "", "", ""]


class _Launcher:
    """Stands in for Hydra's launcher: the JobReturns of a finished, an unfinished (None) and
    a failed (exception) trial, as run_job builds them."""

    def __init__(self) -> None:
        self.launched: list = []

    def launch(self, overrides, initial_job_idx):
        self.launched += list(overrides)
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=0.25),
                JobReturn(status=JobStatus.COMPLETED, _return_value=None),
                JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("diverged"))]


def test_failed_and_unfinished_trials_are_failures_not_zeros(tmp_path, monkeypatch):
    cfg = _hydra_cfg("hydra/sweeper=optuna_miou", "hydra.sweeper.n_trials=3",
                     "hydra.sweeper.n_jobs=3", f"hydra.sweep.dir={tmp_path}")
    studies = []
    create = optuna.create_study
    monkeypatch.setattr(optuna, "create_study",
                        lambda **kw: studies.append(create(**kw)) or studies[-1])
    sweeper = instantiate(cfg.hydra.sweeper).sweeper  # the plugin's OptunaSweeperImpl
    sweeper.config, sweeper.hydra_context, sweeper.launcher = cfg, object(), _Launcher()
    sweeper.sweep(["optim.lr=tag(log,interval(1e-4,1e-1))"])  # max_failure_rate 1.0: no raise
    states = [t.state for t in studies[0].trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.FAIL]
    assert [t.value for t in studies[0].trials] == [0.25, None, None]  # never a 0
    assert yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())[
        "best_value"] == 0.25


def test_a_minimising_sweeper_is_refused_with_one_line():
    check_sweep_direction(_hydra_cfg(*SEARCH[:1]).hydra.sweeper)
    check_sweep_direction(_hydra_cfg().hydra.sweeper)  # the basic sweeper has no direction
    with pytest.raises(ConfigError, match="direction=minimize.*hydra/sweeper=optuna_miou"):
        check_sweep_direction(_hydra_cfg("hydra/sweeper=optuna").hydra.sweeper)


def test_the_search_runs_its_trials_through_the_slurm_launcher():
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = _hydra_cfg(*SEARCH[:1], "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    sweeper = Plugins.instance().instantiate_sweeper(
        config=cfg, hydra_context=HydraContext(config_loader=None, callbacks=None),
        task_function=lambda c: None)
    launcher = sweeper.sweeper.launcher
    assert isinstance(launcher, SlurmLauncher)
    assert launcher.params["partition"] == "gpu" and launcher.params["max_num_timeout"] == 20


@pytest.mark.slow
def test_search_with_the_submitit_launcher(tmp_path):
    """Two trials as two submitit jobs (the local executor stands in for SLURM)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "segtrain", "-m", *SEARCH, "hydra/launcher=submitit_local",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *TINY,
            f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    scores = [json.loads((tmp_path / n / "metrics.json").read_text())["miou"] for n in "01"]
    assert results["best_value"] == max(scores)
