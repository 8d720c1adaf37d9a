"""Confusion matrix and the standard segmentation scores (Long et al. 2015, Sec. 5: pixel
accuracy, mean accuracy, mean IU, frequency-weighted IU).

Rule for a class absent from both prediction and ground truth: its IoU (and accuracy) is
undefined (0/0) and reported as NaN; means are taken over the classes where it is defined,
so an absent class neither helps nor hurts mIoU. A class present in the prediction only has
IoU 0 (it counts). Ignored pixels (``ignore_index``) never enter the matrix.

The evaluator's metrics follow detectron2's ``DatasetEvaluator`` protocol (``Metric``):
``reset`` before an evaluation, ``process`` for every batch of predictions, ``evaluate`` for
the scores; the ``Evaluator`` loops over the data once and feeds every metric. A new metric
is a ``Metric`` subclass passed to the ``Evaluator`` (``metrics=[...]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: the summary scores of an evaluation (key -> name in tables): the run's history, best.pt,
#: the logs, metrics.json's summary line and the ablation tables
SUMMARY_METRICS = {"miou": "mIoU", "pixel_acc": "pixel acc", "mean_acc": "mean acc",
                   "fwiou": "fwIoU"}


@dataclass
class EvalBatch:
    """What a metric sees of one batch of the evaluation loader, in the loader's order.

    Attributes:
        pred: predicted labels, N x H x W int64 on the evaluation device (set once the CRF
            processes, if any, have returned them).
        target: ground truth, N x H x W on the same device (``ignore_index`` for void).
        meta: the items' ``"meta"`` dicts (``name``, paths, ...), one per image.
        rgb: the images as read (uint8 N x H x W x 3) when some metric or the CRF asked for
            them (``Metric.needs_rgb``), else None.
    """

    pred: torch.Tensor | None
    target: torch.Tensor
    meta: Any
    rgb: np.ndarray | None


class Metric:
    """detectron2's evaluator protocol: ``reset(device)``, ``process(batch)`` for every
    ``EvalBatch``, ``evaluate() -> dict`` of scores (keys unique among the metrics)."""

    def reset(self, device: torch.device) -> None:
        raise NotImplementedError

    def process(self, batch: EvalBatch) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError

    def needs_rgb(self) -> bool:
        """Whether the next ``process`` needs ``batch.rgb`` (the images as read)."""
        return False


class ConfusionMatrix(Metric):
    """Accumulates ``matrix[gt, pred]`` on the tensors' device with one bincount per batch;
    as a ``Metric``, summed over the ranks and scored by ``scores_from_matrix``."""

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset(device)

    def reset(self, device: torch.device | str) -> None:
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                                  device=device)

    def process(self, batch: EvalBatch) -> None:
        self.update(batch.pred, batch.target)

    def evaluate(self) -> dict[str, Any]:
        """The scores over every rank's images and the matrix itself (``confusion_matrix``)."""
        self.all_reduce()
        return {**self.compute(), "confusion_matrix": self.matrix.cpu().tolist()}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and ground-truth label maps (same shape)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}")
        n = self.num_classes
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= n))
        if bad.any():
            raise ValueError(f"target holds labels outside 0..{n - 1} and ignore "
                             f"{self.ignore_index}: {torch.unique(target[bad]).tolist()}")
        idx = n * target[valid].to(torch.int64) + pred[valid].to(torch.int64)
        self.matrix += torch.bincount(idx, minlength=n * n).view(n, n).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over distributed ranks (no-op when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def compute(self) -> dict[str, float | list[float]]:
        return scores_from_matrix(self.matrix)


def scores_from_matrix(matrix: torch.Tensor) -> dict[str, float | list[float]]:
    """Pixel acc, mean acc, mIoU, fwIoU and per-class IoU/acc from ``matrix[gt, pred]``."""
    m = matrix.double()
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    total = m.sum()
    nan = torch.tensor(float("nan"), dtype=m.dtype, device=m.device)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    freq = gt / total.clamp(min=1)
    present = ~torch.isnan(iou)
    return {
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_acc": float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any()
        else float("nan"),
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "fwiou": float((freq[present] * iou[present]).sum()) if total > 0 else float("nan"),
        "iou": iou.tolist(),
        "acc": acc.tolist(),
    }


def percent(score: float | None, signed: bool = False) -> str:
    """A score as a user reads it everywhere (log lines, tables, the final line, evaluate,
    sweep summaries, scripts): percent with two decimals, as the papers print them
    (0.665312 -> ``66.53``; ``signed``, a difference of two scores: ``+1.20``); metrics.json
    and the other stored files keep the fraction. None or NaN (a class without pixels):
    ``n/a``."""
    if score is None or score != score:
        return "n/a"
    return f"{100 * score:+.2f}" if signed else f"{100 * score:.2f}"


def format_table(scores: dict, class_names: list[str] | tuple[str, ...]) -> str:
    """Per-class IoU/accuracy table plus the summary scores (``percent``), as plain text."""
    width = max(10, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
    for name, iou, acc in zip(class_names, scores["iou"], scores["acc"]):
        lines.append(f"{name:<{width}}  {percent(iou):>7}  {percent(acc):>7}")
    lines.append("-" * (width + 18))
    for key in SUMMARY_METRICS:
        lines.append(f"{key:<{width}}  {percent(scores[key]):>7}")
    return "\n".join(lines)


class SampleFigures(Metric):
    """The first ``num_samples`` (image as read, ground truth, prediction) triples of this
    rank, for the comparison figures; no score."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.samples: list[dict[str, np.ndarray]] = []

    def reset(self, device: torch.device) -> None:
        self.samples = []

    def needs_rgb(self) -> bool:
        return len(self.samples) < self.num_samples

    def process(self, batch: EvalBatch) -> None:
        if self.needs_rgb():
            self.samples.append({"image": batch.rgb[0], "mask": batch.target[0].cpu().numpy(),
                                 "pred": batch.pred[0].cpu().numpy()})

    def evaluate(self) -> dict[str, Any]:
        return {}
