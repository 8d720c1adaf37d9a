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


def _wandb_history(run_file) -> list[dict]:
    """The history rows (``run.log`` calls) of an offline W&B run file, read with the file
    format's own definition: a 7-byte header (``:W&B``, magic, version), then LevelDB log
    records (32 KiB blocks; a 7-byte header of crc, length and type per chunk; FULL=1, FIRST=2,
    MIDDLE=3, LAST=4), each a protobuf ``Record`` of wandb's schema."""
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, block, pos, chunk, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record
            record = Record.FromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({"_step": record.history.step.num,
                             **{item.key or "/".join(item.nested_key):
                                json.loads(item.value_json) for item in record.history.item}})
            chunk = b""
    return rows


def test_a_tiny_wandb_run_offline_and_its_resume_share_one_run(tmp_path, one_thread,
                                                               monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from segtrain.engine.callbacks import wandb_log

    pytest.importorskip("wandb")
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # a single run, not a sweep's
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    wandb_run = RUN[:-1] + ["logger=wandb"]
    train(compose_config(wandb_run + ["trainer.max_iters=2", "trainer.resume=null"]), run)
    run_id = (run / wandb_log.RUN_ID_FILE).read_text().strip()
    train(compose_config(wandb_run + ["trainer.max_iters=4", "trainer.resume=auto",
                                      "trainer.resume_allow_schedule_change=true"]), run)
    # offline, in the run folder: one folder per start, both under the run's one id
    starts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(s.name.endswith(f"-{run_id}") for s in starts)
    rows = [r for s in starts for r in _wandb_history(s / f"run-{run_id}.wandb")]
    saved = json.loads((run / "metrics.json").read_text())
    assert [(r["_step"], r["val/miou"]) for r in rows if "val/miou" in r] == [
        (h["iteration"], h["miou"]) for h in saved["history"]]
    final = next(r for r in rows if r["_step"] == 4 and "val/miou" in r)
    assert final["val/iou/background"] == saved["iou"][0]
    assert [r["_step"] for r in rows if "train/loss/total" in r] == [1, 2, 3, 4]
    assert (starts[-1] / "files" / "metrics.json").is_file()


def test_a_wandb_mode_is_checked_with_one_line():
    from segtrain.engine.callbacks.wandb_log import WandbLog
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="logger.callback.mode='ofline': expected one of "
                                          "offline, online, disabled"):
        WandbLog("segtrain", None, "ofline", "segtrain", {}, [], None, 255)
