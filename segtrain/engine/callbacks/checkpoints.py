"""Checkpoints: ``last.pt`` (the full training state) every ``checkpoint_interval``
iterations, at the last and after an error (the last completed step), ``best.pt`` (the
weights that were scored: their average with ``trainer.ema.decay``) at each evaluation that
beats every earlier one; the best-model policy is ``best_evaluation``."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from segtrain.core import checkpoint
from segtrain.engine.callbacks.base import Callback, Evaluation
from segtrain.engine.finite import weights_finite_flag
from segtrain.models.base import bare

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer

log = logging.getLogger("segtrain")


def best_evaluation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best model of a run: the first evaluation with the highest mIoU (an undefined
    mIoU, NaN, never wins); None before any evaluation."""
    best, best_miou = None, -math.inf
    for entry in history:
        if entry["miou"] > best_miou:
            best, best_miou = entry, entry["miou"]
    return best


class Checkpoints(Callback):
    """Writes checkpoints/last.pt every ``interval`` iterations (every rank agrees first that
    the loss and the weights are finite) and after an error (the state of the last completed
    step, when its weights are finite: the error says what was kept), and checkpoints/best.pt
    when an evaluation is the run's best (``best_evaluation``)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            # kill -9 during a write leaves .last.pt.*.tmp files: this run owns the folder
            checkpoint.remove_stale_temporaries(trainer.run_dir / "checkpoints")

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.due(self.interval):
            trainer.checkpoint()

    def on_evaluation(self, trainer: Trainer, evaluation: Evaluation) -> None:
        history = evaluation.history
        if history and best_evaluation(history) is history[-1]:
            # the weights that were scored: the average with trainer.ema.decay
            trainer.save("best.pt", {"model": bare(trainer.eval_model).state_dict(),
                                     "iteration": evaluation.iteration,
                                     "metrics": history[-1], "config": trainer.config_yaml})

    def on_exception(self, trainer: Trainer, error: BaseException) -> str | None:
        if trainer.rng_after_step is None:  # no step completed since the start (or resume)
            return None
        last = trainer.run_dir / "checkpoints" / "last.pt"
        if not trainer.at_step_boundary:
            note = f"last.pt not saved: the step after iteration {trainer.iteration} was " \
                   f"interrupted in its optimizer update"
        elif not bool(weights_finite_flag(trainer.bare_model)):
            note = f"last.pt not saved: the weights after iteration {trainer.iteration} are " \
                   f"not finite"
        else:
            try:
                # no collective here (another rank may be gone): this rank's RNG states only
                trainer.save("last.pt", trainer.state_dict(rng=[trainer.rng_after_step]))
                note = f"saved {last} at iteration {trainer.iteration} (the last completed " \
                       f"step): resume with trainer.resume={trainer.run_dir}"
            except Exception as save_err:  # noqa: BLE001 - report the first error
                log.error("could not save last.pt either: %s", save_err)
                return None
        if trainer.dist.is_main:
            log.error("training stopped by %s at iteration %d; %s", type(error).__name__,
                      trainer.iteration, note)
        return note
