"""Evaluation is fp32 unless asked otherwise: ``eval.precision`` drives the
trainer's periodic evaluation and ``segtrain.evaluate`` alike, so a run trained under bf16
autocast writes in metrics.json what ``segtrain.evaluate`` reports for its checkpoint; the
predictor sums, averages and max-fuses logits in fp32. And a network trained with
``model.msc.train_scales`` is not evaluated through a second pyramid."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segtrain import app
from segtrain.core.distributed import DistInfo
from segtrain.errors import ConfigError
from segtrain.eval.inference import Predictor
from segtrain.evaluate import evaluate
from segtrain.losses.ce import CrossEntropyLoss
from segtrain.models.base import SegmentationModel
from segtrain.models.msc import MultiScaleInputs
from tests.conftest import CONF_DIR


def _compose(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def test_bf16_run_reports_what_evaluate_reports(tiny_cfg, tmp_path, one_thread, monkeypatch):
    cfg = tiny_cfg("trainer.precision=bf16", "trainer.max_iters=4", "trainer.eval_interval=4",
                   "trainer.checkpoint_interval=4", "dataset.val.num_samples=8")
    assert cfg.eval.precision == "fp32"  # the default
    # whether the evaluation's forward passes ran under autocast, and the training's did
    autocast = {"train": [], "eval": []}
    predict, loss = Predictor.__call__, CrossEntropyLoss.forward

    def predict_spy(self, model, image):
        autocast["eval"].append(torch.is_autocast_enabled("cpu"))
        return predict(self, model, image)

    def loss_spy(self, outputs, batch):
        autocast["train"].append(torch.is_autocast_enabled("cpu"))
        return loss(self, outputs, batch)

    monkeypatch.setattr(Predictor, "__call__", predict_spy)
    monkeypatch.setattr(CrossEntropyLoss, "forward", loss_spy)
    app.train(cfg, tmp_path)
    assert autocast["train"] and all(autocast["train"])  # trained under bf16 autocast
    assert autocast["eval"] and not any(autocast["eval"])  # evaluated in fp32
    trained = json.loads((tmp_path / "metrics.json").read_text())
    result = evaluate(_compose("evaluate", f"run={tmp_path}", "num_workers=0", "device=cpu"),
                      "whole")
    assert result["iteration"] == trained["iteration"] == 4
    assert result["confusion_matrix"] == trained["confusion_matrix"]
    assert result["miou"] == trained["miou"]
    assert result["eval_config"]["precision"] == "fp32"


def test_eval_precision_is_checked_and_names_its_key(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="eval.precision='fp8': expected one of fp32, bf16"):
        app.train(tiny_cfg("eval.precision=fp8"), tmp_path)


class HalfLogits(SegmentationModel):
    """bf16 logits of a fixed pattern, as a network under bf16 autocast returns them."""

    TRAIN_KEYS = frozenset({"out", "out_lowres"})

    def forward(self, x):
        h, w = x.shape[-2:]
        ramp = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w) / 7.0 + 1000.0
        out = torch.cat([ramp, -ramp, ramp / 3], 1).expand(x.shape[0], -1, -1, -1)
        if not self.training:
            return {"out": out.to(torch.bfloat16)}
        return {"out": out.to(torch.bfloat16), "out_lowres": out.to(torch.bfloat16)}


def test_sliding_window_and_flip_sum_in_fp32():
    image = torch.zeros(1, 3, 20, 20)
    predictor = Predictor(mode="slide", crop_size=8, stride=3, flip=True)
    logits = predictor(HalfLogits(), image)
    assert logits.dtype == torch.float32
    # by hand: every window's bf16 output as fp32, summed and divided by the count in fp32
    expected = torch.zeros(1, 3, 20, 20)
    flipped = torch.zeros(1, 3, 20, 20)
    count = torch.zeros(1, 1, 20, 20)
    rows = cols = [0, 3, 6, 9, 12]
    for y in rows:
        for x in cols:
            out = HalfLogits()(image[:, :, y:y + 8, x:x + 8])["out"].float()
            expected[:, :, y:y + 8, x:x + 8] += out
            flipped[:, :, y:y + 8, x:x + 8] += out
            count[:, :, y:y + 8, x:x + 8] += 1
    expected = 0.5 * (expected / count + (flipped / count).flip(-1))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_msc_wrapper_fuses_in_fp32():
    out = MultiScaleInputs(HalfLogits(), [1.0, 0.5])(torch.zeros(1, 3, 16, 16))
    assert out["out"].dtype == torch.float32 and out["out_lowres"].dtype == torch.float32
    assert out["scales"][0.5]["out"].dtype == torch.bfloat16  # each scale as the network gave it


@pytest.mark.parametrize("eval_name", ["msc", "msc_crf", "msc_flip"])
def test_msc_trained_model_refuses_a_second_pyramid(eval_name, tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.msc.train_scales=[1.0,0.75,0.5]", f"eval={eval_name}")
    with pytest.raises(ConfigError, match=r"model.msc.train_scales=\[1.0, 0.75, 0.5\] already "
                                          r"fuses .* pyramid twice \(9 forward passes"):
        app.train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # refused at start-up


def test_msc_trained_model_evaluates_with_its_own_pyramid(tiny_cfg):
    cfg = tiny_cfg("model.msc.train_scales=[1.0,0.5]", "eval=msc_crf",
                   "eval.predictor.scales=[1.0]")
    evaluator = app.build_evaluator(cfg, app.build_val_set(cfg), DistInfo())
    assert evaluator.inference.predictor.scales == [1.0] and evaluator.inference.crf is not None


def test_evaluate_without_an_eval_option_scores_with_the_runs_own_eval(tiny_cfg, tmp_path,
                                                                       one_thread):
    # an experiment that evaluates at half resolution (camvid_deeplabv3plus_mobilenetv2 does):
    # `python -m segtrain.evaluate run=<run>` must reproduce its metrics.json, not eval=whole's
    cfg = tiny_cfg("trainer.max_iters=2", "trainer.eval_interval=2",
                   "trainer.checkpoint_interval=2", "dataset.val.num_samples=4",
                   "eval.predictor.scales=[0.5]")
    app.train(cfg, tmp_path)
    trained = json.loads((tmp_path / "metrics.json").read_text())
    command = _compose("evaluate", f"run={tmp_path}", "num_workers=0", "device=cpu")
    own = evaluate(command, "run", {}, keep_run_eval=True)
    assert own["eval_config"]["predictor"]["scales"] == [0.5]
    assert own["confusion_matrix"] == trained["confusion_matrix"]
    # an eval.* key given on the command line is set over the run's eval
    flipped = evaluate(_compose("evaluate", f"run={tmp_path}", "num_workers=0", "device=cpu",
                                "eval.predictor.flip=true"),
                       "run", {"eval.predictor.flip": "true"}, keep_run_eval=True)
    assert flipped["eval_config"]["predictor"]["scales"] == [0.5]
    assert flipped["eval_config"]["predictor"]["flip"] is True
    # a run written before an eval key existed (eval.precision) takes the command's value
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    old = OmegaConf.create(state["config"])
    del old.eval["precision"]
    state["config"] = OmegaConf.to_yaml(old)
    torch.save(state, tmp_path / "checkpoints" / "last.pt")
    older = evaluate(_compose("evaluate", f"run={tmp_path}", "checkpoint=last",
                              "num_workers=0", "device=cpu"), "run", {}, keep_run_eval=True)
    assert older["eval_config"]["precision"] == "fp32"
    assert older["confusion_matrix"] == trained["confusion_matrix"]
    # an eval option chosen on the command line replaces the run's
    whole = evaluate(command, "whole")
    assert whole["eval_config"]["predictor"]["scales"] == [1.0]
