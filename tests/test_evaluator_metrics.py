"""The evaluator as a protocol (detectron2's reset/process/evaluate): one pass over the data
feeds every metric object; the confusion matrix is one of them, and its scores equal a NumPy
count of the labels the one inference path gives image by image, for whole, multi-scale,
sliding-window and CRF evaluation (the CRF in worker processes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from segtrain.data.loader import eval_loader
from segtrain.eval.crf import DenseCRF
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.inference import Inference, Predictor
from segtrain.eval.metrics import EvalBatch, Metric

K = 4


class TinyNet(nn.Module):
    """A fixed, seeded two-layer conv net: logits depend on colour and neighbourhood."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, K, 3, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.b(torch.relu(self.a(x)))}


def _items() -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    items = []
    for i, (h, w) in enumerate([(24, 30), (20, 20), (31, 17)]):
        rgb = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        mask = rng.integers(0, K, (h, w))
        mask[rng.random((h, w)) < 0.1] = 255
        image = ((rgb / 255.0 - 0.5) / 0.25).astype(np.float32).transpose(2, 0, 1).copy()
        items.append({"image": torch.from_numpy(image), "mask": torch.from_numpy(mask),
                      "rgb": torch.from_numpy(rgb), "meta": {"name": f"image{i}"}})
    return items


CRF = dict(iterations=3, pos_w=3, pos_xy_std=3, bi_w=4, bi_xy_std=20, bi_rgb_std=10)
SETUPS = {
    "whole": (lambda: Inference(Predictor()), 0),
    "msc_max_flip": (lambda: Inference(Predictor(scales=(0.5, 0.75, 1.0), flip=True)), 0),
    "slide": (lambda: Inference(Predictor(mode="slide", crop_size=16, stride=10)), 0),
    "crf_in_workers": (lambda: Inference(Predictor(scales=(0.75, 1.0)), DenseCRF(**CRF)), 1),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_scores_equal_a_numpy_count_of_the_inference_labels(setup):
    make, workers = SETUPS[setup]
    model, items = TinyNet().eval(), _items()
    evaluator = Evaluator(eval_loader(items, num_workers=0), K, 255, list("abcd"), make(),
                          num_samples=2, crf_workers=workers)
    scores = evaluator.run(model, torch.device("cpu"))

    expected = np.zeros((K, K), np.int64)
    inference = make()
    for item in items:  # one image at a time, through Inference's own call
        labels = inference(model, item["image"][None], item["rgb"].numpy()[None])[0].numpy()
        mask = item["mask"].numpy()
        keep = mask != 255
        np.add.at(expected, (mask[keep], labels[keep]), 1)
    assert np.array_equal(np.array(scores["confusion_matrix"]), expected)
    tp, gt, pred = np.diag(expected), expected.sum(1), expected.sum(0)
    present = gt + pred > 0
    assert scores["miou"] == pytest.approx((tp / (gt + pred - tp))[present].mean(), abs=1e-12)
    assert scores["pixel_acc"] == pytest.approx(tp.sum() / expected.sum(), abs=1e-12)
    assert len(evaluator.samples) == 2 and evaluator.samples[1]["pred"].shape == (20, 20)


class PixelsPerImage(Metric):
    """A metric of the caller's own: the names and the counted pixels of every image."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def reset(self, device: torch.device) -> None:
        self.devices.append(device)
        self.seen: list[tuple[str, int]] = []

    def process(self, batch: EvalBatch) -> None:
        for meta, target in zip(batch.meta, batch.target):
            self.seen.append((meta["name"], int((target != 255).sum())))

    def evaluate(self) -> dict[str, Any]:
        return {"pixels_per_image": dict(self.seen)}


def test_every_metric_object_sees_every_batch_once_in_loader_order():
    items, metric = _items(), PixelsPerImage()
    evaluator = Evaluator(eval_loader(items, num_workers=0), K, 255, list("abcd"),
                          Inference(Predictor()), num_samples=0, metrics=[metric])
    for _ in range(2):  # reset between evaluations: nothing carried over
        scores = evaluator.run(TinyNet(), torch.device("cpu"))
        assert [name for name, _ in metric.seen] == ["image0", "image1", "image2"]
    assert metric.devices == [torch.device("cpu")] * 2
    counts = {i["meta"]["name"]: int((i["mask"] != 255).sum()) for i in items}
    assert scores["pixels_per_image"] == counts
    assert sum(counts.values()) == np.sum(scores["confusion_matrix"])  # beside the matrix's


def test_two_metrics_with_the_same_score_name_are_refused():
    class Shadow(PixelsPerImage):
        def evaluate(self) -> dict[str, Any]:
            return {"miou": 1.0}

    evaluator = Evaluator(eval_loader(_items(), num_workers=0), K, 255, list("abcd"),
                          Inference(Predictor()), metrics=[Shadow()])
    with pytest.raises(ValueError, match=r"Shadow returns scores another metric returns: "
                                         r"\['miou'\]"):
        evaluator.run(TinyNet(), torch.device("cpu"))
