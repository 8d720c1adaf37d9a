"""Pruning of a hyper-parameter search's trial (``hydra/sweeper=optuna_miou
hydra.sweeper.pruner=median``): each evaluation's validation mIoU goes to the search's trial
(step = iteration) and, when the search's pruner says so, the run ends after that step as
``pruned`` (last.pt saved, metrics.json keeping the last scores). ``segtrain.sweeper``
links the trial to the study on disk; this callback only needs its ``report``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from segtrain.core import distributed
from segtrain.engine.callbacks.base import Callback, Evaluation

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer


class Trial(Protocol):
    def report(self, miou: float, iteration: int) -> bool:
        """Record ``miou`` at ``iteration``; whether the search's pruner stops the trial."""


class TrialPruning(Callback):
    """Reports every evaluation to ``trial`` (on rank 0; ``None`` on the other ranks) and
    ends the run after the step where the pruner stopped it, on every rank."""

    def __init__(self, trial: Trial | None) -> None:
        self.trial = trial

    def on_evaluation(self, trainer: Trainer, evaluation: Evaluation) -> None:
        stop = False
        if trainer.dist.is_main:
            stop = self.trial.report(float(evaluation.scores["miou"]), evaluation.iteration)
            # the last evaluation ends the trial anyway, complete
            stop = stop and evaluation.iteration < trainer.max_iters
        if trainer.dist.enabled:  # rank 0 decides, every rank stops at the same step
            stop = distributed.all_gather_objects(stop)[0]
        if stop:
            trainer.stop.prune(evaluation.iteration)
