"""``logger=mlflow``: a tiny run leaves a local MLflow store (SQLite, no server) holding its
params, its mIoU and per-class IoU at each evaluation and its artifacts; a resumed run
continues the same tracked run."""

from __future__ import annotations

import json

import pytest

from segtrain.app import train
from segtrain.engine.callbacks.mlflow_log import RUN_ID_FILE, flatten
from tests.conftest import compose_config

mlflow = pytest.importorskip("mlflow")  # the tracking extra (make install installs it)

RUN = ["dataset.image_size=32", "dataset.train.num_samples=8", "dataset.val.num_samples=2",
       "trainer.global_batch_size=2", "trainer.num_workers=0", "trainer.eval_interval=2",
       "trainer.log_interval=1", "trainer.checkpoint_interval=2", "trainer.device=cpu",
       "logger=mlflow"]


def test_flatten_the_config_into_dotted_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": "1", "a.c": "[1, 2]", "d": "None"}


def test_a_tiny_mlflow_run_and_its_resume_share_one_tracked_run(tmp_path, one_thread,
                                                                monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from mlflow.tracking import MlflowClient

    # a single run, as `python -m segtrain` starts it: no Hydra state left in this worker by a
    # sweep test before (a multirun's HydraConfig would name the experiment after its folder)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)

    store, run = tmp_path / "store", tmp_path / "run"
    logger = [f"logger.callback.store={store}"]
    train(compose_config(RUN + logger + ["trainer.max_iters=2", "trainer.resume=null"]), run)
    # resumed to a longer schedule (asked for): the same MLflow run goes on
    train(compose_config(RUN + logger + ["trainer.max_iters=4", "trainer.resume=auto",
                                         "trainer.resume_allow_schedule_change=true"]), run)
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("segtrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == (run / RUN_ID_FILE).read_text().strip()
    tracked = runs[0]
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["trainer.max_iters"] == "2"  # the params of the first start
    assert tracked.data.params["logger.callback.store"] == str(store)
    saved = json.loads((run / "metrics.json").read_text())
    history = client.get_metric_history(tracked.info.run_id, "val/miou")
    assert [(m.step, m.value) for m in history] == [(h["iteration"], h["miou"])
                                                     for h in saved["history"]]
    background = client.get_metric_history(tracked.info.run_id, "val/iou/background")
    assert background[-1].value == saved["iou"][0]
    assert [m.step for m in client.get_metric_history(tracked.info.run_id,
                                                      "train/loss/total")] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert {"metrics.json", "samples"} <= artifacts
    assert [a.path for a in client.list_artifacts(tracked.info.run_id, "samples")] == [
        "samples/iter_0000002.png", "samples/iter_0000004.png"]
