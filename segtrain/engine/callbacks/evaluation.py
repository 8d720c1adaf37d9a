"""Periodic evaluation: the evaluator's scores every ``eval_interval`` iterations and at the
last one, and the run's record of them (``history``, saved in ``last.pt``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from segtrain.core import distributed
from segtrain.engine.callbacks.base import Callback, Evaluation
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.metrics import SUMMARY_METRICS

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
        self.history: list[dict[str, Any]] = []

    def on_step_end(self, trainer: Trainer) -> None:
        if not trainer.due(self.interval):
            return
        trainer.check_finite()
        scores = self.evaluator.run(trainer.eval_model, trainer.device)  # EMA if trainer.ema
        evaluation = Evaluation(trainer.iteration, scores)
        if trainer.dist.is_main:
            self.history.append({**{k: scores[k] for k in SUMMARY_METRICS},
                                 "iteration": trainer.iteration})
            evaluation.history, evaluation.samples = self.history, self.evaluator.samples
            evaluation.per_image, evaluation.worst = self.evaluator.per_image, \
                self.evaluator.worst
        trainer.publish(evaluation)

    def on_train_end(self, trainer: Trainer) -> None:
        """The final evaluation, when the run has none at ``max_iters`` (it failed, and the
        resumed run starts at the end): scored now, and last.pt records it."""
        done = bool(self.history) and self.history[-1]["iteration"] == trainer.iteration
        if trainer.dist.enabled:  # rank 0 keeps the history: every rank evaluates, or none
            done = distributed.all_gather_objects(done)[0]
        if done:
            return
        self.on_step_end(trainer)
        trainer.checkpoint()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
