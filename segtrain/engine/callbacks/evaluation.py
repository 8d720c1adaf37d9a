"""Periodic evaluation: the evaluator's scores every ``eval_interval`` iterations and at the
last one, handed to the trainer (``Trainer.publish``), which records them (its run record:
history, best.pt, metrics.json) and passes them to every callback."""

from __future__ import annotations

from typing import TYPE_CHECKING

from segtrain.engine.callbacks.base import Callback, Evaluation
from segtrain.eval.evaluator import Evaluator

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer


class PeriodicEvaluation(Callback):
    """Scores the model with ``evaluator`` every ``interval`` iterations and at the last.

    It runs at ``eval.precision`` (fp32 by default), not in the training autocast: the scores
    that pick best.pt and fill metrics.json are those ``segtrain.evaluate`` reproduces. Before
    it, every rank agrees that the loss stayed finite (no evaluation of NaN weights).
    """

    def __init__(self, evaluator: Evaluator, interval: int) -> None:
        self.evaluator, self.interval = evaluator, interval

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.due(self.interval):
            return
        trainer.check_finite()
        scores = self.evaluator.run(trainer.eval_model, trainer.device)  # EMA if trainer.ema
        evaluation = Evaluation(trainer.iteration, scores)
        if trainer.dist.is_main:
            evaluation.samples = self.evaluator.samples
            evaluation.per_image, evaluation.worst = self.evaluator.per_image, \
                self.evaluator.worst
        trainer.publish(evaluation)

    def on_train_end(self, trainer: Trainer) -> None:
        """The final evaluation, when the run has none at ``max_iters`` (it failed, and the
        resumed run starts at the end): scored now, and last.pt records it. The run record
        is the same on every rank: every rank evaluates, or none."""
        if trainer.record.evaluated_at(trainer.iteration):
            return
        self.on_step_end(trainer)
        trainer.checkpoint()
