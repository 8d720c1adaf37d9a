"""Online hard example mining cross-entropy (OHEM; Wu, Shen and van den Hengel, "High-
performance Semantic Segmentation Using Very Deep Fully Convolutional Networks", arXiv
1604.04339, 2016, Sec. 3.3 "online bootstrapping" of hard pixels), with the rule of the
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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segtrain.losses.ce import CrossEntropyLoss


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
