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
from segtrain.eval.metrics import EvalBatch, Metric


def image_ids(meta: Any, count: int) -> list[str]:
    """The batch's image ids: each item's ``meta["name"]``, else its dataset index."""
    if not meta:
        return [str(i) for i in range(count)]
    return [str(m.get("name", m.get("index"))) for m in meta]


def per_image_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(intersection, union), int64 (N, classes), of a batch of label maps (N,H,W); ignored
    pixels count nowhere."""
    n, k = pred.shape[0], num_classes
    valid = target != ignore_index
    image = torch.arange(n, device=pred.device).view(n, 1, 1).expand_as(target)[valid]
    gt, pr = target[valid].to(torch.int64), pred[valid].to(torch.int64)

    def count(index: torch.Tensor) -> torch.Tensor:
        return torch.bincount(index, minlength=n * k).view(n, k)

    inter = count((image * k + gt)[gt == pr])
    return inter, count(image * k + gt) + count(image * k + pr) - inter


def _gather(part: Any) -> list[Any]:
    """Every rank's ``part`` (this one's alone when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [part]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    return parts


class PerImageCounts(Metric):
    """Each image's per-class intersection and union (pixels), beside the confusion matrix:
    ``eval.save_per_image``. After ``evaluate``, ``result`` holds ``{"ids": [...],
    "intersection": int64 (images, classes), "union": ...}`` of every rank's images in image
    order; no score joins the evaluation's."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.result: dict[str, Any] | None = None
        self.reset("cpu")

    def reset(self, device: torch.device | str) -> None:
        self.ids: list[str] = []
        self.intersection: list[torch.Tensor] = []
        self.union: list[torch.Tensor] = []

    @torch.no_grad()
    def process(self, batch: EvalBatch) -> None:
        inter, union = per_image_counts(batch.pred, batch.target, self.num_classes,
                                        self.ignore_index)
        self.ids.extend(image_ids(batch.meta, len(inter)))
        self.intersection.append(inter.cpu())
        self.union.append(union.cpu())

    def evaluate(self) -> dict[str, Any]:
        empty = torch.zeros(0, self.num_classes, dtype=torch.int64)
        mine = {"ids": list(self.ids),
                "intersection": torch.cat(self.intersection or [empty]).numpy(),
                "union": torch.cat(self.union or [empty]).numpy()}
        parts = _gather(mine)
        # rank r scored images r, r + W, ... (segtrain.data.loader.eval_loader)
        order = sorted((i, r) for r, part in enumerate(parts) for i in range(len(part["ids"])))
        self.result = mine if len(parts) == 1 else {
            "ids": [parts[r]["ids"][i] for i, r in order],
            "intersection": np.stack([parts[r]["intersection"][i] for i, r in order]),
            "union": np.stack([parts[r]["union"][i] for i, r in order])}
        return {}


class WorstImages(Metric):
    """The ``count`` images with the lowest per-image mIoU (``image_miou``): ``eval.dump_worst``.
    After ``evaluate``, ``worst`` lists ``{"id", "miou", "image" (as read), "mask", "pred"}``
    over every rank's images, lowest first (ties in loader order); no score."""

    def __init__(self, count: int, num_classes: int, ignore_index: int = 255) -> None:
        self.count, self.num_classes, self.ignore_index = count, num_classes, ignore_index
        self.worst: list[dict[str, Any]] = []

    def reset(self, device: torch.device | str) -> None:
        self.worst = []

    def needs_rgb(self) -> bool:
        return True

    @torch.no_grad()
    def process(self, batch: EvalBatch) -> None:
        inter, union = per_image_counts(batch.pred, batch.target, self.num_classes,
                                        self.ignore_index)
        scores = image_miou(inter.cpu().numpy(), union.cpu().numpy())
        for i, (name, score) in enumerate(zip(image_ids(batch.meta, len(scores)), scores)):
            if score == score:  # an all-ignored image has no score
                self.worst.append({"id": name, "miou": float(score), "image": batch.rgb[i],
                                   "mask": batch.target[i].cpu().numpy(),
                                   "pred": batch.pred[i].cpu().numpy()})
        self.worst.sort(key=lambda w: w["miou"])  # stable
        del self.worst[self.count:]

    def evaluate(self) -> dict[str, Any]:
        merged = [w for part in _gather(self.worst) for w in part]
        self.worst = sorted(merged, key=lambda w: w["miou"])[:self.count]
        return {}


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
