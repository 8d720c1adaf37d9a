"""``trainer.ema.decay``: the weight average against the formula by hand, an interrupted and
resumed EMA run equal to an uninterrupted one (the average included), and
``segtrain.evaluate`` of an EMA run reproducing its training-time scores."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from segtrain import runs
from segtrain.app import train
from segtrain.core import checkpoint
from segtrain.engine.ema import WeightEMA
from segtrain.engine.trainer import Trainer
from segtrain.errors import ConfigError
from segtrain.eval.evaluator import Evaluator
from segtrain.evaluate import evaluate
from segtrain.models.base import bare
from tests.conftest import CONF_DIR, compose_config


def test_the_average_follows_the_formula_and_batchnorm_counters_are_copied():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    decay = 0.9
    ema = WeightEMA(net, decay)
    snapshots = []
    for _ in range(3):  # three "optimizer steps": new weights, new running statistics
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 1, 3, 3))  # moves running_mean/var, num_batches_tracked
        ema.update(net)
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
    # by hand: W1, then 0.9 * previous + 0.1 * W_t
    for key in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        expected = snapshots[0][key]
        for snap in snapshots[1:]:
            expected = decay * expected + (1 - decay) * snap[key]
        torch.testing.assert_close(ema.module.state_dict()[key], expected)
    # the integer counter is the live network's (3 batches), not an average truncated to 1
    assert int(ema.module.state_dict()["1.num_batches_tracked"]) == 3
    assert ema.updates == 3
    with pytest.raises(ConfigError, match=r"trainer.ema.decay=1.0: expected"):
        WeightEMA(net, 1.0)


def test_the_schema_refuses_a_decay_outside_0_1():
    from segtrain import config_schema

    with pytest.raises(ConfigError, match=r"trainer.ema.decay=1.5: expected a number in "
                                          r"\[0, 1\) or null"):
        config_schema.check(compose_config(["trainer.ema.decay=1.5"]))


EMA_RUN = ["dataset.image_size=32", "dataset.train.num_samples=8", "dataset.val.num_samples=2",
           "trainer.max_iters=4", "trainer.global_batch_size=2", "trainer.num_workers=0",
           "trainer.eval_interval=2", "trainer.log_interval=2",
           "trainer.checkpoint_interval=2", "trainer.device=cpu", "trainer.resume=null",
           "trainer.ema.decay=0.5", "model.dropout=0.5"]


def _stop_at(monkeypatch, iteration: int) -> None:
    """A stop request (as SIGTERM makes) right after step ``iteration``."""
    step = Trainer._step

    def stepping(self, batches):
        step(self, batches)
        if self.iteration + 1 == iteration:
            self.request_stop(15)

    monkeypatch.setattr(Trainer, "_step", stepping)


def test_an_interrupted_ema_run_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch,
                                                                 one_thread):
    full, split = tmp_path / "full", tmp_path / "split"
    scored = []  # the weights each periodic evaluation scored
    run = Evaluator.run

    def recording(self, model, device):
        scored.append({k: v.clone() for k, v in bare(model).state_dict().items()})
        return run(self, model, device)

    with monkeypatch.context() as patch:
        patch.setattr(Evaluator, "run", recording)
        train(compose_config(EMA_RUN), full)
    with monkeypatch.context() as patch:
        _stop_at(patch, 1)
        assert train(compose_config(EMA_RUN), split)["status"] == "stopped"
    assert checkpoint.load(split)["ema"]["updates"] == 1
    train(compose_config(EMA_RUN[:-3] + [f"trainer.resume={split}"] + EMA_RUN[-2:]), split)
    a, b = checkpoint.load(full), checkpoint.load(split)
    assert a["iteration"] == b["iteration"] == 4 and b["ema"]["updates"] == 4
    for part in ("model", "ema"):
        weights_a = a[part] if part == "model" else a[part]["model"]
        weights_b = b[part] if part == "model" else b[part]["model"]
        for key in weights_a:
            assert torch.equal(weights_a[key], weights_b[key]), f"{part} {key} differs"
    # the average is not the trained weights (decay 0.5 over 4 steps), and it is what the
    # last evaluation scored and what evaluation and prediction load from last.pt
    assert not all(torch.equal(a["model"][k], a["ema"]["model"][k]) for k in a["model"])
    assert len(scored) == 2 and all(torch.equal(scored[-1][k], v)
                                    for k, v in a["ema"]["model"].items())
    run_cfg = OmegaConf.create(a["config"])
    opened = runs.Run(None, full / "checkpoints" / "last.pt", a, run_cfg)
    loaded = runs.build_model(opened, torch.device("cpu")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in a["ema"]["model"].items())
    scores_a = json.loads((full / "metrics.json").read_text())
    scores_b = json.loads((split / "metrics.json").read_text())
    assert scores_a["history"] == scores_b["history"]

    # segtrain.evaluate scores the average: last.pt (its "ema") and best.pt both reproduce
    # the scores training wrote
    for choice in ("last", "best"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            ecfg = compose(config_name="evaluate", overrides=[
                f"run={full}", f"checkpoint={choice}", "num_workers=0", "device=cpu",
                f"name={choice}"])
        result = evaluate(ecfg, "whole", keep_run_eval=True)
        best = checkpoint.load(full / "checkpoints" / "best.pt")["metrics"]
        expected = scores_a if choice == "last" else best
        assert result["miou"] == expected["miou"]
        # the file names the checkpoint it scored: last.pt adds _last to name=last
        written = json.loads((full / ("eval_last_last.json" if choice == "last"
                                      else "eval_best.json")).read_text())
        if choice == "last":
            assert written["iou"] == scores_a["iou"]
            assert written["confusion_matrix"] == scores_a["confusion_matrix"]
