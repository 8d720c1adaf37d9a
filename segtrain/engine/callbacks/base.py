"""The hooks of the training loop. ``segtrain.engine.trainer.Trainer`` calls them on every
rank, callback by callback in the order of its list, at these points:

    on_fit_start                          once, after a resume, before the first step
    on_log(terms, rate)                   every log_interval steps (and at the last)
    on_step_end                           after every optimizer step (and its on_log)
    on_evaluation(evaluation)             when a callback hands the trainer an Evaluation
                                          (after the trainer recorded it: best.pt and
                                          metrics.json written, ``trainer.record`` updated)
    on_train_end                          once the run is at max_iters (also a resumed run
                                          that already was), before on_fit_end
    on_exception(error) -> line | None    when the loop raised, after the trainer saved
                                          the last completed step (not a non-finite loss,
                                          whose check keeps the last good state itself)
    on_fit_end(status)                    once: "finished", "stopped" or "failed"
                                          (metrics.json already says so)

A hook that writes a file does it on rank 0 only (``trainer.dist.is_main``); a hook that
calls a collective (``trainer.checkpoint``, ``trainer.check_finite``, an evaluation) does it
on every rank at the same iteration. ``state_dict`` is merged into the training checkpoint
(its keys must not collide with the trainer's) and ``load_state_dict`` gets that checkpoint
back on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segtrain.eval.metrics import SUMMARY_METRICS

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer


@dataclass
class Evaluation:
    """The scores of one evaluation at ``iteration`` (every rank), the run's ``history`` of
    evaluation summaries with this one last (the trainer's record, filled when it is
    published), and the (image, gt, prediction) ``samples`` for figures (rank 0; empty
    elsewhere)."""

    iteration: int
    scores: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    per_image: dict[str, Any] | None = None  # eval.save_per_image: segtrain.eval.per_image
    worst: list[dict[str, Any]] = field(default_factory=list)  # eval.dump_worst


class Callback:
    """A no-op for every hook: a callback overrides the ones it needs."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_log(self, trainer: Trainer, terms: dict[str, float], rate: float) -> None:
        """``terms``: the loss terms' means over the interval and the ranks; ``rate``:
        iterations per second over the interval."""

    def on_step_end(self, trainer: Trainer) -> None:
        pass

    def on_evaluation(self, trainer: Trainer, evaluation: Evaluation) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    def on_exception(self, trainer: Trainer, error: BaseException) -> str | None:
        """Called on each rank that raised, without collectives (another rank may be gone);
        the error is raised after. A returned line is added to a ``UserError``'s message
        (by the trainer). Not called for a KeyboardInterrupt (a second Ctrl-C ends at once)."""
        return None

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def train_scalars(trainer: Trainer, terms: dict[str, float], rate: float) -> dict[str, float]:
    """What every logger (TensorBoard, MLflow, W&B) records at a log interval, by name: the
    loss terms, each parameter group's rate and the iterations per second."""
    values = {f"train/loss/{k}": v for k, v in terms.items()}
    for i, group in enumerate(trainer.optimizer.param_groups):
        values[f"train/lr/{group.get('name', str(i))}"] = group["lr"]
    values["train/iters_per_s"] = rate
    return values


def val_scalars(scores: dict[str, Any], class_names: list[str]) -> dict[str, float]:
    """What every logger records of an evaluation, by name: the summary metrics and each
    class's IoU (a NaN IoU, a class absent from prediction and ground truth, is left out)."""
    values = {f"val/{k}": scores[k] for k in SUMMARY_METRICS}
    values.update({f"val/iou/{name}": iou for name, iou in zip(class_names, scores["iou"])
                   if iou == iou})
    return values
