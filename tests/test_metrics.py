"""Confusion-matrix scores against an independent NumPy computation."""

import math

import numpy as np
import pytest
import torch

from segtrain.eval.metrics import ConfusionMatrix, format_table, scores_from_matrix


def numpy_scores(gt: np.ndarray, pred: np.ndarray, n: int, ignore: int) -> dict:
    keep = gt != ignore
    g, p = gt[keep], pred[keep]
    ious, accs, freqs = [], [], []
    for c in range(n):
        tp = np.sum((g == c) & (p == c))
        fp = np.sum((g != c) & (p == c))
        fn = np.sum((g == c) & (p != c))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        accs.append(tp / np.sum(g == c) if np.sum(g == c) else np.nan)
        freqs.append(np.sum(g == c) / g.size)
    ious, accs, freqs = map(np.array, (ious, accs, freqs))
    ok = ~np.isnan(ious)
    return {"pixel_acc": np.mean(g == p), "mean_acc": np.nanmean(accs),
            "miou": np.nanmean(ious), "fwiou": np.sum(freqs[ok] * ious[ok]), "iou": ious}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_numpy_with_ignore_pixels(seed):
    rng = np.random.default_rng(seed)
    n, ignore = 7, 255
    gt = rng.integers(0, n, (3, 41, 37))
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, n, gt.shape))
    gt[rng.random(gt.shape) < 0.15] = ignore
    cm = ConfusionMatrix(n, ignore)
    for i in range(3):  # accumulate batch by batch
        cm.update(torch.from_numpy(pred[i]), torch.from_numpy(gt[i]))
    ours, ref = cm.compute(), numpy_scores(gt, pred, n, ignore)
    for key in ("pixel_acc", "mean_acc", "miou", "fwiou"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_allclose(ours["iou"], ref["iou"], atol=1e-12)
    assert int(cm.matrix.sum()) == int(np.sum(gt != ignore))


def test_class_absent_from_prediction_and_truth_is_nan_and_excluded():
    # class 2 appears nowhere: IoU undefined (NaN), mIoU averages classes 0 and 1 only
    gt = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    s = cm.compute()
    assert math.isnan(s["iou"][2]) and math.isnan(s["acc"][2])
    assert s["iou"][0] == pytest.approx(1 / 2) and s["iou"][1] == pytest.approx(2 / 3)
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_only_predicted_counts_as_zero():
    gt = torch.tensor([[0, 0, 0, 0]])
    pred = torch.tensor([[0, 0, 0, 2]])
    s = scores_from_matrix(_matrix(pred, gt, 3))
    assert s["iou"][2] == 0.0 and math.isnan(s["iou"][1])
    assert s["miou"] == pytest.approx((3 / 4 + 0.0) / 2)


def _matrix(pred, gt, n):
    cm = ConfusionMatrix(n)
    cm.update(pred, gt)
    return cm.matrix


def test_labels_outside_range_are_rejected():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))


def test_table_names_every_class():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    table = format_table(cm.compute(), ["sky", "road", "car"])
    assert "sky" in table and "road" in table and "n/a" in table and "miou" in table
