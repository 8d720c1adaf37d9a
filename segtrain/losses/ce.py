"""Pixel-wise cross-entropy (DeepLab v2 Sec. 4: "the sum of cross-entropy terms for each
spatial position"), with ignore index, optional class weights (SegNet Sec. 4.1, median
frequency balancing, Eigen & Fergus 2015) and an auxiliary term (PSPNet Sec. 3.3: weight 0.4).

``OhemCrossEntropyLoss``: online hard example mining (OHEM; Wu, Shen and van den Hengel,
"High-performance Semantic Segmentation Using Very Deep Fully Convolutional Networks", arXiv
1604.04339, 2016: "online bootstrapping" of the hard pixels) with the rule of the
PSPNet / OCNet / HRNet-OCR codebases (OCNet ``utils/loss.py`` ``OhemCrossEntropy2d``, reused
by the SPNet authors' ``util/loss.py``; HRNet-OCR ``OhemCrossEntropy``: thresh 0.7,
min_kept 100000):

- p_i = softmax probability of the true class at every non-ignored pixel of the batch;
- if there are at most ``min_kept`` such pixels, all are kept;
- otherwise the threshold is ``thresh``, raised to the ``min_kept``-th smallest p_i when
  fewer than ``min_kept`` pixels lie at or below ``thresh``; the pixels with p_i at or below
  the threshold are kept (ties with the ``min_kept``-th value are kept too);
- the loss is the (class-weighted) mean cross-entropy of the kept pixels; ignored pixels
  never count. The auxiliary output is mined the same way (HRNet-OCR applies its OHEM
  criterion to both outputs).

The other losses (``OhemCrossEntropyLoss``, ``affinity.AffinityLoss``) derive from
``CrossEntropyLoss``: they share its class weights, ignore index and auxiliary term. Every
loss declares ``required_keys``, the model outputs it needs; ``app.py`` refuses a model
that does not declare them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyLoss(nn.Module):
    """``(outputs, batch) -> {"ce", ["aux",] "total"}``.

    Args:
        ignore_index: label excluded from the loss (255).
        class_weights: one weight per class, or None. (``median_freq`` is resolved to a
            list by the app from the dataset's statistics before this is built.)
        aux_weight: weight of the ``"aux"`` output's cross-entropy when the model returns one.

    The mean runs over non-ignored pixels (a weighted mean with class weights).
    """

    required_keys = frozenset({"out"})  # "aux" is used when present, not required

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        weight = None if class_weights is None else torch.as_tensor(
            list(class_weights), dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)

    def _check_classes(self, logits: torch.Tensor) -> None:
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ValueError(f"loss.class_weights has {self.weight.numel()} entries but the "
                             f"model predicts {logits.shape[1]} classes")

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits)
        # float32 for the softmax even under autocast
        return F.cross_entropy(logits.float(), target, weight=self.weight,
                               ignore_index=self.ignore_index)

    def segmentation_terms(self, outputs: dict[str, torch.Tensor],
                           target: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({"ce", ["aux"]}, ce + aux_weight * aux)``: the part every loss shares."""
        terms = {"ce": self._ce(outputs["out"], target)}
        total = terms["ce"]
        if "aux" in outputs and self.aux_weight > 0:
            terms["aux"] = self._ce(outputs["aux"], target)
            total = total + self.aux_weight * terms["aux"]
        return terms, total

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        terms, total = self.segmentation_terms(outputs, batch["mask"])
        terms["total"] = total
        return terms


def ohem_keep(prob: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """Boolean mask over the true-class probabilities ``prob`` (valid pixels only)."""
    n = prob.numel()
    if n <= min_kept:
        return torch.ones_like(prob, dtype=torch.bool)
    threshold = torch.as_tensor(thresh, dtype=prob.dtype, device=prob.device)
    if min_kept > 0:
        kth = torch.kthvalue(prob, min_kept).values
        threshold = torch.maximum(threshold, kth)
    return prob <= threshold


class OhemCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy over the hard pixels only; ``{"ce", ["aux",] "total"}``.

    Args:
        ignore_index: label excluded from the loss (255).
        class_weights: one weight per class, or None.
        aux_weight: weight of the ``"aux"`` output's term (0.4).
        thresh: keep pixels whose true-class probability is at most this (0.7).
        min_kept: keep at least this many pixels per batch (100000).
    """

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4, thresh: float = 0.7, min_kept: int = 100000) -> None:
        super().__init__(ignore_index, class_weights, aux_weight)
        if not 0.0 < thresh <= 1.0 or min_kept < 0:
            raise ValueError(f"loss.thresh must be in (0, 1] and loss.min_kept >= 0, got "
                             f"{thresh} and {min_kept}")
        self.thresh, self.min_kept = float(thresh), int(min_kept)

    def kept_mask(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pixels (N x H x W, bool) that enter the loss."""
        valid = target != self.ignore_index
        with torch.no_grad():
            prob = F.softmax(logits.float(), dim=1)
            true = prob.gather(1, target.where(valid, 0).unsqueeze(1)).squeeze(1)
            keep = torch.zeros_like(valid)
            keep[valid] = ohem_keep(true[valid], self.thresh, self.min_kept)
        return keep

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits)
        keep = self.kept_mask(logits, target)
        mined = target.where(keep, torch.full_like(target, self.ignore_index))
        return F.cross_entropy(logits.float(), mined, weight=self.weight,
                               ignore_index=self.ignore_index)
