"""Pixel-wise cross-entropy (DeepLab v2 Sec. 4: "the sum of cross-entropy terms for each
spatial position"), with ignore index, optional class weights (SegNet Sec. 4.1, median
frequency balancing, Eigen & Fergus 2015) and an auxiliary term (PSPNet Sec. 3.3: weight 0.4).

The other losses (``ohem``, ``affinity``) derive from ``CrossEntropyLoss``: they share its
class weights, ignore index and auxiliary term. Every loss declares ``required_keys``, the
model outputs it needs; ``app.py`` refuses a model that does not declare them all.
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
