"""``logger=mlflow``: the run tracked in MLflow beside the run folder's own files.

Params: the resolved config, flattened (``trainer.max_iters``...), once, when the tracked run
is created. Metrics: every loss term and each group's learning rate at each log interval,
mIoU, pixel and mean accuracy, fwIoU and every class's IoU at each evaluation. Artifacts: the
sample figure of each evaluation, ``metrics.json`` and ``per_image.npz`` at the end.

The store: ``tracking_uri`` (a team server, ``http://...``), else a SQLite file in ``store``
(``sqlite:///<store>/mlflow.db``, artifacts in ``<store>/artifacts``): no server. MLflow 3
refuses its plain-folder store unless ``MLFLOW_ALLOW_FILE_STORE=true`` and points to SQLite,
which ``mlflow-skinny`` opens with sqlalchemy and alembic (the ``tracking`` extra installs
all three). ``mlflow ui --backend-store-uri sqlite:///<store>/mlflow.db`` (full ``mlflow``
package) shows it. One tracked run per segtrain run; its id is kept in
``<run>/mlflow_run_id``, so a resumed run continues the same tracked run. Only rank 0 logs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segtrain.engine.callbacks.base import Callback, Evaluation, train_scalars, val_scalars
from segtrain.errors import ConfigError
from segtrain.viz import comparison_strip

if TYPE_CHECKING:
    from segtrain.engine.trainer import Trainer

log = logging.getLogger("segtrain")

RUN_ID_FILE = "mlflow_run_id"
#: MLflow's status of a run ending with each of the trainer's statuses
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "pruned": "KILLED", "failed": "FAILED"}


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay one value."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(tree)}


class MLflowLog(Callback):
    """Logs the run to MLflow (see the module docstring).

    Args:
        store: folder of the local SQLite store and artifacts (used when ``tracking_uri``
            is null).
        tracking_uri: an MLflow tracking URI (a team server); null: the local store.
        experiment: the MLflow experiment (a sweep's jobs share one: ``segtrain.app``
            passes the sweep folder).
        params: the resolved config (nested dict). class_names, palette, ignore_index: of
            the dataset, for per-class metrics and the sample figure.
    """

    def __init__(self, store: str, tracking_uri: str | None, experiment: str,
                 params: dict[str, Any], class_names: list[str], palette: np.ndarray,
                 ignore_index: int) -> None:
        self.store = Path(store).expanduser().resolve()
        self.tracking_uri = tracking_uri or f"sqlite:///{self.store / 'mlflow.db'}"
        self.experiment, self.params = experiment, params
        self.class_names, self.palette, self.ignore_index = class_names, palette, ignore_index
        self.client, self.run_id = None, None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("logger=mlflow needs MLflow: pip install -e '.[tracking]' "
                              "(make install does)") from None
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its migrations' chatter
        if self.tracking_uri.startswith("sqlite:"):
            self.store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        saved = trainer.run_dir / RUN_ID_FILE
        if saved.is_file():  # a resumed run: the same tracked run
            self.run_id = saved.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(self._experiment_id(),
                                         run_name=trainer.run_dir.name,
                                         tags={"segtrain.run_dir": str(trainer.run_dir)})
            self.run_id = run.info.run_id
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(self.run_id + "\n")
            self._log_params()
        log.info("mlflow: run %s of experiment %r in %s", self.run_id, self.experiment,
                 self.tracking_uri)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = (self.store / "artifacts").as_uri() \
            if self.tracking_uri.startswith("sqlite:") else None
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def _log_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(self.params).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in values.items() if v == v])

    def on_log(self, trainer: Trainer, terms: dict[str, float], rate: float) -> None:
        if self.client is None:
            return
        self._metrics(train_scalars(trainer, terms, rate), trainer.iteration)

    def on_evaluation(self, trainer: Trainer, evaluation: Evaluation) -> None:
        if self.client is None:
            return
        scores, it = evaluation.scores, evaluation.iteration
        self._metrics(val_scalars(scores, self.class_names), it)
        if evaluation.samples:
            strip = comparison_strip(evaluation.samples, self.palette, self.ignore_index)
            self.client.log_image(self.run_id, strip, f"samples/iter_{it:07d}.png")

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        if self.client is None:
            return
        for name in ("metrics.json", "per_image.npz"):  # what the run folder holds now
            if (trainer.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(trainer.run_dir / name))
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))
        self.client = None
