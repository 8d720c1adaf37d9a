"""Hyper-parameter search (``hydra/sweeper=optuna_miou``, segtrain/sweeper.py): a real
3-trial search on the embedded dataset with the median pruner, resumed by the same command,
failed and unfinished trials as Optuna failures (not zeros), the direction check, the SLURM
launcher under the sweeper, and the trial table of scripts/ablation_table.py."""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from optuna.trial import TrialState

from segtrain.__main__ import check_sweep_direction
from segtrain.core.distributed import DistInfo
from segtrain.data.loader import train_loader
from segtrain.engine.callbacks.base import Callback, Evaluation
from segtrain.engine.callbacks.trial_pruning import TrialPruning
from segtrain.engine.trainer import Trainer
from segtrain.errors import ConfigError
from segtrain.eval.metrics import SUMMARY_METRICS
from segtrain.sweeper import chosen_pruner, open_trial, study_storage
from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, REPO, TINY, OneConv

sys.path.insert(0, str(REPO / "scripts"))
import ablation_table  # noqa: E402

SEARCH = ["hydra/sweeper=optuna_miou", "optim.lr=tag(log,interval(1e-4,1e-1))"]
# a good rate and one too small to learn anything: the pruner has a bad trial to stop
PRUNED_SEARCH = ["hydra/sweeper=optuna_miou", "optim.lr=choice(0.01,1e-7)",
                 "hydra.sweeper.pruner=median", "trainer.eval_interval=2"]


def _hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", return_hydra_config=True,
                       overrides=list(overrides))


def _sweep(root: Path, n_trials: int) -> None:
    """``python -m segtrain -m ...`` in this process (its jobs run in it too: Hydra's basic
    launcher), ``n_trials`` at most."""
    proc = run_module("segtrain", "-m", *TINY, *PRUNED_SEARCH,
                      f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweep.dir={root}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name="segtrain",
                             storage=study_storage(f"sqlite:///{root}/optuna.db"))


@pytest.fixture(scope="module")
def search(tmp_path_factory, one_thread) -> tuple[Path, dict]:
    """``python -m segtrain -m hydra/sweeper=optuna_miou 'optim.lr=choice(0.01,1e-7)'
    hydra.sweeper.pruner=median``, 3 tiny trials, then the same command with n_trials=4.
    Returns the sweep folder and what the first command left (the trials' metrics.json, the
    study's trials)."""
    root = tmp_path_factory.mktemp("search") / "multirun"
    _sweep(root, 3)
    first = {p.parent.name: p.read_bytes() for p in root.glob("*/metrics.json")}
    first["study"] = [(t.number, t.state, t.value) for t in _study(root).trials]
    _sweep(root, 4)
    return root, first


def test_three_trial_search_prunes_the_bad_trial(search):
    root, first = search
    trials = {number: state for number, state, _ in first["study"]}
    assert sorted(trials) == [0, 1, 2]
    pruned = [n for n, state in trials.items() if state == TrialState.PRUNED]
    assert pruned and all(state in (TrialState.COMPLETE, TrialState.PRUNED)
                          for state in trials.values())
    for number in pruned:
        run = root / str(number)
        metrics = json.loads(first[str(number)])
        # ended cleanly: its last scores kept, saying pruned; last.pt saved at that step
        assert metrics["status"] == "pruned" and metrics["finished"] is False
        assert metrics["iteration"] < metrics["max_iters"] == 6
        assert (run / "checkpoints" / "last.pt").is_file()
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())[0] == \
            "optim.lr=1e-07"
        # Optuna keeps the last reported mIoU: the one of the run's last evaluation
        value = next(v for n, _, v in first["study"] if n == number)
        assert value == pytest.approx(metrics["miou"])
        # the median rule, from the run folders: its best mIoU so far is below the median
        # of the completed trials' mIoU at that iteration (each run's evaluation history)
        at = metrics["iteration"]
        done = [json.loads(first[str(n)]) for n, s in trials.items()
                if s == TrialState.COMPLETE and n < number]
        median = statistics.median(next(h["miou"] for h in m["history"] if h["iteration"] == at)
                                   for m in done)
        assert max(h["miou"] for h in metrics["history"]) < median


def test_the_same_command_resumes_the_study(search):
    root, first = search
    study = _study(root)
    # the first three trials as they were, one more trial in a new folder
    assert [(t.number, t.state, t.value) for t in study.trials[:3]] == first["study"]
    assert len(study.trials) == 4 and study.trials[3].state in (TrialState.COMPLETE,
                                                                TrialState.PRUNED)
    assert yaml.safe_load((root / "3" / ".hydra" / "overrides.yaml").read_text())[-1] == \
        "optuna_trial=3"
    for number in "012":
        assert (root / number / "metrics.json").read_bytes() == first[number]
    results = yaml.safe_load((root / "optimization_results.yaml").read_text())
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert results["best_value"] == max(t.value for t in completed)
    assert results["trials"]["complete"] + results["trials"]["pruned"] == 4
    scores = {t.number: json.loads((root / str(t.number) / "metrics.json").read_text())
              for t in completed}
    assert all(scores[t.number]["miou"] == t.value for t in completed)  # the final mIoU


def test_trial_table_of_the_search(search, capsys):
    root, _ = search
    assert ablation_table.main([str(root)]) == 0  # optimization_results.yaml: the trial view
    rows = list(ablation_table.csv.DictReader(
        (root / "ablation_table.csv").read_text().splitlines()))
    study = _study(root)
    ok = sorted((t for t in study.trials if t.state == TrialState.COMPLETE),
                key=lambda t: -t.value)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert [r["run"] for r in rows[:len(ok)]] == [str(t.number) for t in ok]
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, len(ok) + 1)] + \
        ["-"] * len(pruned)
    for row in rows[len(ok):]:  # the pruned trials, as such, with the mIoU they had then
        assert row["status"].startswith("pruned (iteration ") and row["mIoU"] == "n/a"
        assert "optuna_trial" not in row  # the trial number is the run folder's name
    best = yaml.safe_load((root / "optimization_results.yaml").read_text())
    marked = [r for r in rows if r["sweeper's best"] == "yes"]
    assert len(marked) == 1 and marked[0]["run"] == str(best["best_trial"])
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
        self.first_job: list[int] = []

    def launch(self, overrides, initial_job_idx):
        self.launched += list(overrides)
        self.first_job.append(initial_job_idx)
        return [JobReturn(status=JobStatus.COMPLETED, _return_value=0.25),
                JobReturn(status=JobStatus.COMPLETED, _return_value=None),
                JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("diverged"))]


def test_failed_and_unfinished_trials_are_failures_not_zeros(tmp_path):
    cfg = _hydra_cfg("hydra/sweeper=optuna_miou", "hydra.sweeper.n_trials=4",
                     "hydra.sweeper.n_jobs=3", f"hydra.sweep.dir={tmp_path}")
    # an earlier sweep of this study was interrupted while its trial 0 ran
    storage = study_storage(f"sqlite:///{tmp_path}/optuna.db")
    optuna.create_study(study_name="segtrain", storage=storage, direction="maximize").ask()
    sweeper = instantiate(cfg.hydra.sweeper).sweeper  # segtrain.sweeper.PruningSweeperImpl
    sweeper.config, sweeper.hydra_context, sweeper.launcher = cfg, object(), _Launcher()
    sweeper.sweep_dir = str(tmp_path)
    sweeper.sweep(["optim.lr=tag(log,interval(1e-4,1e-1))"])  # max_failure_rate 1.0: no raise
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                               TrialState.FAIL, TrialState.FAIL]
    assert [t.value for t in study.trials] == [None, 0.25, None, None]  # never a 0
    # n_trials is the study's total; the new trials' folders are their numbers
    assert sweeper.launcher.first_job == [1]
    assert [o[-1] for o in sweeper.launcher.launched] == [f"optuna_trial={n}" for n in (1, 2, 3)]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == 0.25 and results["best_trial"] == 1
    assert results["trials"] == {"complete": 1, "pruned": 0, "fail": 3}


def test_a_pruner_name_is_checked_and_a_trial_needs_its_search():
    cfg = _hydra_cfg("hydra/sweeper=optuna_miou", *TINY).hydra.sweeper
    assert chosen_pruner(None, cfg.pruners) is None
    assert chosen_pruner("hyperband", cfg.pruners) == {
        "_target_": "optuna.pruners.HyperbandPruner", "reduction_factor": 3,
        "min_resource": 3, "max_resource": 6}  # TINY's eval_interval and max_iters
    with pytest.raises(ConfigError, match="hydra.sweeper.pruner=mean: expected null or one "
                                          "of median, hyperband"):
        chosen_pruner("mean", cfg.pruners)
    with pytest.raises(ConfigError, match="optuna_trial=2: a trial of hydra/sweeper="
                                          "optuna_miou"):
        open_trial(2, _hydra_cfg().hydra.sweeper)  # the basic sweeper: no study


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


class _Scores(Callback):
    """An evaluation every 3 iterations whose mIoU is the iteration / 100."""

    def on_step_end(self, trainer) -> None:
        if trainer.iteration % 3 == 0:
            scores = {key: trainer.iteration / 100 for key in SUMMARY_METRICS}
            trainer.publish(Evaluation(trainer.iteration, scores))


class _Trial:
    """Stands in for segtrain.sweeper.StudyTrial: the pruner stops the trial at 6."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, int]] = []

    def report(self, miou: float, iteration: int) -> bool:
        self.reports.append((miou, iteration))
        return iteration == 6


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_pruned_trial_stops_after_that_step_with_last_pt(tmp_path, ranks):
    """One process, and rank 0 of a world that DistInfo calls 2 ranks (a real one-process
    gloo group: the decision goes through the gather every rank joins)."""
    if ranks == 2:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                             rank=0, world_size=1)
    try:
        model, trial = OneConv(), _Trial()
        data = [{"image": torch.randn(3, 8, 8), "mask": torch.zeros(8, 8, dtype=torch.long),
                 "meta": {}} for _ in range(8)]
        batches = functools.partial(train_loader, data, 2, 0, 0, rank=0, world_size=ranks)
        trainer = Trainer(model, lambda out, batch: {"total": out["out"].mean()},
                          torch.optim.SGD(model.parameters(), lr=0.1), lambda it: 1.0,
                          batches, tmp_path, max_iters=12, iter_size=1, precision="fp32",
                          clip_grad_norm=None, log_interval=5, seed=0,
                          device=torch.device("cpu"), dist=DistInfo(rank=0, world_size=ranks),
                          callbacks=[_Scores(), TrialPruning(trial)])
        assert trainer.fit() == "pruned"
    finally:
        if ranks == 2:
            torch.distributed.destroy_process_group()
    # stopped after the step of that evaluation (not at the next log interval), last.pt saved
    assert trial.reports == [(0.03, 3), (0.06, 6)] and trainer.iteration == 6
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 6
    assert trainer.stop.text(6, tmp_path).startswith(
        "the search's pruner (hydra.sweeper.pruner) stopped this trial after its evaluation "
        "at iteration 6: saved checkpoints/last.pt at iteration 6")
