"""Pixel-wise cross-entropy (DeepLab v2 Sec. 4: "the sum of cross-entropy terms for each
spatial position"), with ignore index, optional class weights (SegNet Sec. 4.1, median
frequency balancing, Eigen & Fergus 2015) and an auxiliary term (PSPNet Sec. 3.3: weight 0.4).
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
        reduction: ``mean`` over non-ignored pixels (weighted mean with class weights).
    """

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        weight = None if class_weights is None else torch.as_tensor(
            list(class_weights), dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ValueError(f"loss.class_weights has {self.weight.numel()} entries but the "
                             f"model predicts {logits.shape[1]} classes")
        # float32 for the softmax even under autocast
        return F.cross_entropy(logits.float(), target, weight=self.weight,
                               ignore_index=self.ignore_index)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        target = batch["mask"]
        terms = {"ce": self._ce(outputs["out"], target)}
        total = terms["ce"]
        if "aux" in outputs and self.aux_weight > 0:
            terms["aux"] = self._ce(outputs["aux"], target)
            total = total + self.aux_weight * terms["aux"]
        terms["total"] = total
        return terms
