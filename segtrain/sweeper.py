"""Pruned hyper-parameter search: hydra-optuna-sweeper's search with a pruner and a study
on disk (``hydra/sweeper=optuna_miou``).

    python -m segtrain -m hydra/sweeper=optuna_miou 'optim.lr=tag(log,interval(1e-4,1e-1))' \\
        hydra.sweeper.n_trials=20 hydra.sweeper.pruner=median hydra.sweep.dir=outputs/search/lr

hydra-optuna-sweeper 1.3 asks Optuna for trials, launches them as Hydra jobs and tells the
study each job's return value; it has no pruning. ``PruningSweeperImpl`` (its subclass, which
Hydra finds through ``hydra_plugins/segtrain_sweeper``) adds:

- the study in a SQLite file of the sweep folder (``hydra.sweeper.storage``), so the same
  command (with the same ``hydra.sweep.dir``) resumes it: ``n_trials`` is the study's total,
  a trial an interrupted sweep left running is marked failed (its folder keeps its last.pt),
  new trials go to the next folders (a trial's folder is its number) and the sampler's seed
  is offset by the trials already drawn, so a resumed search does not draw them again;
- each trial's job gets ``optuna_trial=<number>``; ``open_trial`` links it to the study and
  ``segtrain.engine.callbacks.trial_pruning`` reports every evaluation's mIoU to it (step =
  iteration). The pruner ``hydra.sweeper.pruner`` names (a key of ``hydra.sweeper.pruners``,
  stored in the study for the jobs) may stop it: the job records the iteration in the trial
  (user attribute ``pruned_at_iteration``) and ends cleanly (status ``pruned``, last.pt and
  metrics.json kept); the sweeper then tells the study PRUNED, whose value Optuna sets to the
  last reported mIoU.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from segtrain.errors import ConfigError
from segtrain.eval.metrics import percent

log = logging.getLogger(__name__)

#: the trial's user attribute a job sets when the pruner stopped it (its iteration)
PRUNED_AT = "pruned_at_iteration"
#: the study's user attribute holding the resolved config of its pruner, for the jobs
PRUNER = "segtrain.pruner"


def study_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's storage at ``url``; a relative SQLite path is taken from the working
    directory (the sweeper's and its jobs': Hydra does not change it, ``hydra.job.chdir``
    is false) and its folder created. Optuna 2.10 writes its schema version without a
    commit, which SQLAlchemy 2 (no library-level autocommit) rolls back: a plain URL fails
    its version check, so the engine runs in AUTOCOMMIT."""
    prefix = "sqlite:///"
    if url.startswith(prefix):
        path = Path(url[len(prefix):]).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = prefix + str(path)
    return optuna.storages.RDBStorage(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"})


def chosen_pruner(name: str | None, pruners: DictConfig | dict | None) -> dict[str, Any] | None:
    """The resolved config of ``hydra.sweeper.pruner`` (a key of ``hydra.sweeper.pruners``);
    None: no pruning."""
    if name is None:
        return None
    pruners = pruners or {}
    if name not in pruners:
        raise ConfigError(f"hydra.sweeper.pruner={name}: expected null or one of "
                          f"{', '.join(pruners) or '(none in hydra.sweeper.pruners)'}")
    node = pruners[name]
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class StudyTrial:
    """A job's link to its trial in the study on disk (``open_trial``)."""

    def __init__(self, trial: optuna.trial.Trial) -> None:
        self.trial = trial

    def report(self, miou: float, iteration: int) -> bool:
        """Record ``miou`` at ``iteration``; whether the study's pruner stops the trial now
        (then the trial records the iteration, which tells the sweeper it was pruned)."""
        self.trial.report(miou, iteration)
        if not self.trial.should_prune():
            return False
        log.info("trial %d: pruned after iteration %d (mIoU %s)", self.trial.number,
                 iteration, percent(miou))
        self.trial.set_user_attr(PRUNED_AT, iteration)
        return True


def open_trial(number: int, sweeper: DictConfig) -> StudyTrial:
    """Trial ``number`` of the study of ``sweeper`` (the job's ``hydra.sweeper``), with the
    pruner the sweeper stored in the study."""
    if not sweeper.get("storage") or "pruners" not in sweeper:
        raise ConfigError(f"optuna_trial={number}: a trial of hydra/sweeper=optuna_miou, which "
                          f"sets it for its jobs (with its study on disk); set it to null")
    study = optuna.load_study(study_name=sweeper.study_name,
                              storage=study_storage(sweeper.storage))
    spec = study.user_attrs.get(PRUNER)
    study.pruner = instantiate(spec) if spec else optuna.pruners.NopPruner()
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise ConfigError(f"optuna_trial={number}: the study {sweeper.study_name!r} in "
                          f"{sweeper.storage} has no such trial")
    return StudyTrial(optuna.trial.Trial(study, found[0]._trial_id))


def outcome(ret: JobReturn, frozen: optuna.trial.FrozenTrial) -> tuple[TrialState,
                                                                        float | None]:
    """What to tell the study of a launched trial: COMPLETE with the mIoU the job returned,
    PRUNED when the job recorded its pruning, else FAIL (an exception, or no score: a run
    that did not finish is never a 0)."""
    if ret.status != JobStatus.COMPLETED:
        return TrialState.FAIL, None
    if PRUNED_AT in frozen.user_attrs:
        return TrialState.PRUNED, None
    try:
        value = float(ret.return_value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None
    return (TrialState.COMPLETE, value) if math.isfinite(value) else (TrialState.FAIL, None)


class PruningSweeperImpl(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweeper with a pruner and a resumable study (module docstring).

    Args (beside the plugin's): sampler: the sampler's config, instantiated at the sweep
    (its ``seed`` offset by the trials the study already has); pruner: a key of
    ``pruners`` or None; pruners: the configs of the pruners to choose from.
    """

    def __init__(self, sampler: DictConfig, direction: Any, storage: str, study_name: str,
                 n_trials: int, n_jobs: int, max_failure_rate: float,
                 search_space: DictConfig | None, custom_search_space: str | None,
                 params: DictConfig | None, pruner: str | None,
                 pruners: DictConfig | None) -> None:
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs,
                         max_failure_rate, search_space, custom_search_space, params)
        if not storage:
            raise ConfigError("hydra.sweeper.storage=null: the pruning sweeper keeps its study "
                              "on disk (sqlite:///<file>)")
        self.sampler_config, self.pruner_name, self.pruners = sampler, pruner, pruners
        self.pruner_config = chosen_pruner(pruner, pruners)

    def _open_study(self, directions: list[str],
                    distributions: dict[str, optuna.distributions.BaseDistribution]
                    ) -> optuna.Study:
        self.pruner = instantiate(self.pruner_config) if self.pruner_config else \
            optuna.pruners.NopPruner()
        self.rdb = study_storage(self.storage)
        study = optuna.create_study(study_name=self.study_name, storage=self.rdb,
                                    pruner=self.pruner, directions=directions,
                                    load_if_exists=True)
        study.set_user_attr(PRUNER, self.pruner_config)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.warning("trial %d was left running by an interrupted sweep: marked failed (its "
                        "folder %s/%d keeps its last state)", trial.number, self.sweep_dir,
                        trial.number)
            study.tell(trial.number, state=TrialState.FAIL)
        done = len(study.trials)
        seed = self.sampler_config.get("seed")
        # a resumed search starts its sampler further on, not at the draws it already made
        sampler = instantiate(self.sampler_config, **(
            {"seed": seed + done} if done and seed is not None else {}))
        if isinstance(sampler, functools.partial):  # the grid sampler takes the choices
            sampler = sampler({name: self._to_grid_sampler_choices(d)
                               for name, d in distributions.items()})
        self.sampler = sampler
        return self._reload()

    def _reload(self) -> optuna.Study:
        """The study as the storage holds it now. A Study caches the trials it asked for
        (optuna's _CachedStorage) and never rereads them, so what their jobs wrote (reported
        values, the pruning) is seen by a study loaded after the jobs."""
        return optuna.load_study(study_name=self.study_name, storage=self.rdb,
                                 sampler=self.sampler, pruner=self.pruner)

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(
            self._parse_sweeper_params_config() + list(arguments))
        distributions = {**(self.search_space_distributions or {}), **distributions}
        for name in fixed:
            distributions.pop(name, None)
        directions = self._get_directions()
        if len(directions) != 1:
            raise ConfigError(f"hydra.sweeper.direction={directions}: the pruning sweeper "
                              f"optimises one value (the validation mIoU)")
        study = self._open_study(directions, distributions)
        to_go = self.n_trials - len(study.trials)
        log.info("study %r in %s: %d trials there, %d to run (hydra.sweeper.n_trials=%d), "
                 "pruner %s", study.study_name, self.rdb.url, len(study.trials), max(to_go, 0),
                 self.n_trials, self.pruner_name)
        while to_go > 0:
            trials = [study.ask() for _ in range(min(to_go, self.n_jobs))]
            overrides = [(*o, f"optuna_trial={t.number}") for o, t in
                         zip(self._configure_trials(trials, distributions, fixed), trials)]
            # a trial's folder is its number: a resumed study goes on in new folders
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            self.job_idx = trials[-1].number + 1
            study = self._reload()
            recorded = {t.number: t for t in study.get_trials(deepcopy=False)}
            failures = []
            for trial, ret in zip(trials, returns):
                state, value = outcome(ret, recorded[trial.number])
                try:
                    study.tell(trial.number, value, state)
                except RuntimeError as err:  # the grid sampler stops the study once exhausted
                    if "Study.stop" not in str(err):
                        raise
                if state == TrialState.FAIL:
                    failures.append(ret)
                    log.warning("trial %d failed: %s", trial.number,
                                ret._return_value if ret.status != JobStatus.COMPLETED
                                else "it returned no score")
            if len(failures) / len(returns) > self.max_failure_rate:
                log.error("%d of %d trials failed (hydra.sweeper.max_failure_rate=%s)",
                          len(failures), len(returns), self.max_failure_rate)
                for ret in failures:
                    ret.return_value  # noqa: B018 - raises the job's own error
                raise RuntimeError(f"{len(failures)} of {len(returns)} trials returned no "
                                   f"score (hydra.sweeper.max_failure_rate="
                                   f"{self.max_failure_rate})")
            to_go -= len(trials)
        self._write_results(study)

    def _write_results(self, study: optuna.Study) -> None:
        counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
                  for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        results: dict[str, Any] = {"name": "optuna", "trials": counts,
                                   "pruner": self.pruner_name}
        if counts["complete"]:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value,
                           best_trial=best.number)
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s", best.value)
        else:
            results.update(best_params={}, best_value=None, best_trial=None)
            log.error("no trial of the study completed (%s)", counts)
        OmegaConf.save(OmegaConf.create(results),
                       Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")
