"""The DSRL loss: cross-entropy on SSSR + SISR reconstruction + feature affinity.

Wang, Li, Zhu, Tian and Shan, "Dual Super-Resolution Learning for Semantic Segmentation",
CVPR 2020, Sec. 3.2-3.3:

- Eq. 1, similarity of pixels i and j of a feature map F (C x W' x H'):
  ``S_ij = (F_i / ||F_i||_p)^T (F_j / ||F_j||_p)``, p = 2.
- Eq. 2, the FA loss: ``L_fa = 1 / (W'H')^2 * sum_ij ||S^seg_ij - S^sr_ij||_q``, q = 1,
  i.e. the mean absolute difference of the two similarity matrices. The matrices have
  ``(W'H')^2`` entries, so both feature maps are average-pooled by ``fa_pool`` first (the
  paper computes FA on subsampled maps to bound memory).
- Sec. 3.3, the multi-task objective: ``L = L_ce + w1 * L_mse + w2 * L_fa`` with ``L_mse``
  the mean squared error of the SISR output against the full-resolution input image;
  w1 = 0.1, w2 = 1.0 (``conf/loss/dsrl.yaml``).

``L_ce`` is ``losses.ce.CrossEntropyLoss`` (class weights, ignore index, auxiliary term).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segtrain.errors import ConfigError
from segtrain.losses.ce import CrossEntropyLoss


def similarity_matrix(features: torch.Tensor, pool: int) -> torch.Tensor:
    """Eq. 1 on the map average-pooled by ``pool``: (B, C, H, W) -> (B, N, N), N pixels."""
    h, w = (max(1, math.ceil(n / pool)) for n in features.shape[-2:])
    pooled = F.adaptive_avg_pool2d(features.float(), (h, w)).flatten(2)  # B, C, N
    unit = F.normalize(pooled, p=2, dim=1)
    return unit.transpose(1, 2) @ unit


def feature_affinity_loss(seg: torch.Tensor, sr: torch.Tensor, pool: int) -> torch.Tensor:
    """Eq. 2: mean over pixel pairs (and the batch) of ``|S^seg_ij - S^sr_ij|``."""
    if seg.shape[0] != sr.shape[0] or seg.shape[-2:] != sr.shape[-2:]:
        raise ValueError(f"FA features differ in batch or size: {tuple(seg.shape)} vs "
                         f"{tuple(sr.shape)}")
    # float32 even under mixed precision: the loss is a small difference of cosines
    with torch.autocast(seg.device.type, enabled=False):
        return (similarity_matrix(seg, pool) - similarity_matrix(sr, pool)).abs().mean()


class DSRLLoss(CrossEntropyLoss):
    """``(outputs, batch) -> {"ce", ["aux",] "sr", "fa", "total"}``.

    Args:
        ignore_index: label excluded from the cross-entropy (255).
        class_weights: one weight per class, or None (as ``CrossEntropyLoss``).
        aux_weight: weight of an ``"aux"`` output's cross-entropy.
        sr_weight: w1 of Eq. 5, weight of the SISR mean squared error.
        fa_weight: w2 of Eq. 5, weight of the feature affinity loss.
        fa_pool: average-pooling size of both feature maps before Eq. 1.
    """

    required_keys = frozenset({"out", "sr", "fa_seg", "fa_sr"})

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4, sr_weight: float = 0.1, fa_weight: float = 1.0,
                 fa_pool: int = 16) -> None:
        super().__init__(ignore_index, class_weights, aux_weight)
        if not isinstance(fa_pool, int) or fa_pool < 1:
            raise ConfigError(f"loss.fa_pool must be a positive integer, got {fa_pool!r}")
        self.sr_weight, self.fa_weight, self.fa_pool = sr_weight, fa_weight, fa_pool

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        terms, total = self.segmentation_terms(outputs, batch["mask"])
        sr = outputs["sr"].float()
        # the trainer moves only the mask; the full-resolution image is the SISR target
        target = batch["image"].to(sr.device, non_blocking=True).float()
        if sr.shape != target.shape:
            raise ValueError(f"SISR output {tuple(sr.shape)} does not match the image "
                             f"{tuple(target.shape)}")
        terms["sr"] = F.mse_loss(sr, target)
        terms["fa"] = feature_affinity_loss(outputs["fa_seg"], outputs["fa_sr"], self.fa_pool)
        terms["total"] = total + self.sr_weight * terms["sr"] + self.fa_weight * terms["fa"]
        return terms
