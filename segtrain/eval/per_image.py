"""Per-image evaluation counts (``eval.save_per_image``): each image's per-class
intersection and union in pixels, the input of a bootstrap over images
(``scripts/compare_runs.py``), saved as ``per_image.npz`` beside metrics.json by training and
``eval_<name>_per_image.npz`` by ``segtrain.evaluate``.

Summed over any set of images they give that set's per-class IoU exactly (the union of a
class over the images is the sum of the per-image unions), so a resample of the images is
scored as the evaluator would score it: 2 x num_classes integers per image (a few hundred
bytes), not a confusion matrix per image.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtrain.errors import UserError


class PerImageCounts:
    """Each image's per-class intersection and union (pixels), beside the confusion matrix:
    ``eval.save_per_image``. Summed over any set of images they give that set's IoU exactly
    (the union of a class over images is the sum of the per-image unions), which is what a
    bootstrap over images needs (``scripts/compare_runs.py``): 2 x num_classes integers per
    image instead of a num_classes^2 matrix.

    reset / process / evaluate, as the evaluator's other metrics."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.ids: list[str] = []
        self.intersection: list[torch.Tensor] = []
        self.union: list[torch.Tensor] = []

    @torch.no_grad()
    def process(self, pred: torch.Tensor, target: torch.Tensor, ids: list[str]) -> None:
        """A batch of label maps (N,H,W) and the N image ids."""
        inter, union = self.counts(pred, target)
        self.ids.extend(str(i) for i in ids)
        self.intersection.append(inter.cpu())
        self.union.append(union.cpu())

    @torch.no_grad()
    def counts(self, pred: torch.Tensor, target: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(intersection, union), int64 (N, classes), of a batch of label maps (N,H,W)."""
        n, k = pred.shape[0], self.num_classes
        valid = target != self.ignore_index
        image = torch.arange(n, device=pred.device).view(n, 1, 1).expand_as(target)[valid]
        gt, pr = target[valid].to(torch.int64), pred[valid].to(torch.int64)

        def per_image(labels: torch.Tensor) -> torch.Tensor:
            return torch.bincount(image * k + labels, minlength=n * k).view(n, k)

        same = gt == pr
        inter = torch.bincount((image * k + gt)[same], minlength=n * k).view(n, k)
        return inter, per_image(gt) + per_image(pr) - inter

    def evaluate(self) -> dict[str, Any]:
        """``{"ids": [...], "intersection": int64 (images, classes), "union": ...}``."""
        empty = torch.zeros(0, self.num_classes, dtype=torch.int64)
        return {"ids": list(self.ids),
                "intersection": torch.cat(self.intersection or [empty]).numpy(),
                "union": torch.cat(self.union or [empty]).numpy()}


def image_miou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Each image's mIoU over the classes present in its prediction or ground truth (the
    evaluator's rule for a set of images, applied to one); NaN for an all-ignored image."""
    present = union > 0
    iou = np.divide(intersection, union, out=np.zeros(union.shape), where=present)
    with np.errstate(invalid="ignore"):
        return iou.sum(-1) / np.where(present.any(-1), present.sum(-1), np.nan)


def save(counts: dict[str, Any], class_names: list[str], path: str | Path) -> Path:
    """Write ``PerImageCounts.evaluate()`` and the class names to ``path`` (.npz) atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, ids=np.array(counts["ids"], dtype=str),
                                intersection=counts["intersection"], union=counts["union"],
                                class_names=np.array(list(class_names), dtype=str))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> dict[str, Any]:
    """``{"ids", "intersection", "union", "class_names"}`` of a file ``save`` wrote."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"per-image scores not found: {path} (evaluate with "
                        f"eval.save_per_image=true to write them)")
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in ("ids", "intersection", "union", "class_names")}
    out["ids"], out["class_names"] = out["ids"].tolist(), out["class_names"].tolist()
    return out
