"""``logger=wandb``: the run tracked in Weights & Biases beside the run folder's own files,
offline by default (clusters without network: ``wandb sync <run>/wandb/offline-run-*``
uploads it later from a machine with one).

Config: the resolved config, once, when the tracked run is created. Metrics (step = iteration):
every loss term and each group's learning rate at each log interval, mIoU, pixel and mean
accuracy, fwIoU and every class's IoU at each evaluation, with the sample figure. Files: the
run folder's ``metrics.json`` and ``per_image.npz`` at the end; the status in the summary.

The W&B files go to ``<run>/wandb/`` (``offline-run-<time>-<id>/``). One W&B run per segtrain
run: its id is kept in ``<run>/wandb_run_id``, so a resumed run continues the same W&B run (in
offline mode each start writes its own ``offline-run-*`` folder under that id; ``wandb sync``
joins them). A sweep's jobs share one group: the sweep folder. Only rank 0 logs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from segtrain.engine.callbacks.base import Callback, Evaluation, train_scalars, val_scalars
from segtrain.errors import ConfigError
from segtrain.viz import comparison_strip

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer

log = logging.getLogger("segtrain")

RUN_ID_FILE = "wandb_run_id"
MODES = ("offline", "online", "disabled")


class WandbLog(Callback):
    """Logs the run to W&B (see the module docstring).

    Args:
        project: the W&B project. entity: the W&B team or user (null: the default one).
        mode: offline (files only, no network), online, or disabled.
        experiment: the W&B group (a sweep's jobs share one: ``segtrain.app`` passes the
            sweep folder).
        params: the resolved config (nested dict). class_names, palette, ignore_index: of
            the dataset, for per-class metrics and the sample figure.
    """

    def __init__(self, project: str, entity: str | None, mode: str, experiment: str,
                 params: dict[str, Any], class_names: list[str], palette: np.ndarray,
                 ignore_index: int) -> None:
        if mode not in MODES:
            raise ConfigError(f"logger.callback.mode={mode!r}: expected one of "
                              f"{', '.join(MODES)}")
        self.project, self.entity, self.mode = project, entity, mode
        self.experiment, self.params = experiment, params
        self.class_names, self.palette, self.ignore_index = class_names, palette, ignore_index
        self.run = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger=wandb needs wandb: pip install -e '.[tracking]' "
                              "(make install does)") from None
        saved = trainer.run_dir / RUN_ID_FILE
        resumed = saved.is_file()  # a resumed run: the same W&B run
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        # console="off": train.log already holds the output; W&B would wrap stdout/stderr
        self.run = wandb.init(
            project=self.project, entity=self.entity, mode=self.mode,
            id=saved.read_text().strip() if resumed else None,
            resume="allow" if resumed else None, dir=str(trainer.run_dir),
            name=trainer.run_dir.name, group=self.experiment, config=self.params,
            settings=wandb.Settings(console="off"))
        if not resumed:
            saved.write_text(self.run.id + "\n")
        log.info("wandb: run %s (%s) of project %r in %s", self.run.id, self.mode,
                 self.project, trainer.run_dir / "wandb")

    def on_log(self, trainer: Trainer, terms: dict[str, float], rate: float) -> None:
        if self.run is None:
            return
        self.run.log(train_scalars(trainer, terms, rate), step=trainer.iteration)

    def on_evaluation(self, trainer: Trainer, evaluation: Evaluation) -> None:
        if self.run is None:
            return
        import wandb

        scores = evaluation.scores
        values: dict[str, Any] = val_scalars(scores, self.class_names)
        if evaluation.samples:
            strip = comparison_strip(evaluation.samples, self.palette, self.ignore_index)
            values["val/image_gt_pred"] = wandb.Image(strip)
        self.run.log(values, step=evaluation.iteration)

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        if self.run is None:
            return
        for name in ("metrics.json", "per_image.npz"):  # what the run folder holds now
            if (trainer.run_dir / name).is_file():
                self.run.save(str(trainer.run_dir / name), base_path=str(trainer.run_dir),
                              policy="now")
        self.run.summary["status"] = status
        if status == "stopped":  # a preemption: the requeued job resumes this run
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status in ("finished", "pruned") else 1)
        self.run = None
