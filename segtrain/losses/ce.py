"""Pixel-wise cross-entropy (DeepLab v2 Sec. 4: "the sum of cross-entropy terms for each
spatial position"), with ignore index, optional class weights (SegNet Sec. 4.1, median
frequency balancing, Eigen & Fergus 2015), an auxiliary term (PSPNet Sec. 3.3: weight 0.4),
and optionally U-Net's weight map (Ronneberger et al. 2015, Eq. 2; losses/unet_weights.py).

The U-Net map is computed here, from the batch's final masks on the CPU: it depends on the
geometry after every augmentation (elastic deformation, crops), needs no change to the
dataset items or to collate, and works for every dataset. Its cost (one distance transform
per connected object) suits U-Net's data; it is off by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.losses.unet_weights import unet_weight_map


class CrossEntropyLoss(nn.Module):
    """``(outputs, batch) -> {"ce", ["aux",] "total"}``.

    Args:
        ignore_index: label excluded from the loss (255).
        class_weights: one weight per class, or None. (``median_freq`` is resolved to a
            list by the app from the dataset's statistics before this is built.)
        aux_weight: weight of the ``"aux"`` output's cross-entropy when the model returns one.
        unet_weight_map: ``{w0, sigma, background}`` for U-Net's Eq. 2 weight map, or None.
            The main term is then sum(w(x) * CE(x)) / (number of labelled pixels).

    Without the U-Net map the reduction is the mean over labelled pixels (the weighted mean
    with class weights).
    """

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4,
                 unet_weight_map: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.unet_map = None
        if unet_weight_map is not None:
            unknown = set(unet_weight_map) - {"w0", "sigma", "background"}
            if unknown or not {"w0", "sigma"} <= set(unet_weight_map):
                raise ConfigError(f"loss.unet_weight_map must be null or have keys w0, sigma "
                                  f"(and optionally background), got {dict(unet_weight_map)}")
            if class_weights is not None:
                raise ConfigError("loss.unet_weight_map has its own class balancing (w_c); "
                                  "set loss.class_weights=null with it")
            self.unet_map = {"w0": float(unet_weight_map["w0"]),
                             "sigma": float(unet_weight_map["sigma"]),
                             "background": int(unet_weight_map.get("background", 0))}
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

    def _unet_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        masks = target.detach().cpu().numpy()
        weights = np.stack([unet_weight_map(m, ignore_index=self.ignore_index, **self.unet_map)
                            for m in masks])
        weights = torch.from_numpy(weights).to(logits.device)
        ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                             reduction="none")
        valid = (target != self.ignore_index).sum().clamp(min=1)
        return (weights * ce).sum() / valid

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        target = batch["mask"]
        if self.unet_map is not None:
            terms = {"ce": self._unet_ce(outputs["out"], target)}
        else:
            terms = {"ce": self._ce(outputs["out"], target)}
        total = terms["ce"]
        if "aux" in outputs and self.aux_weight > 0:
            terms["aux"] = self._ce(outputs["aux"], target)
            total = total + self.aux_weight * terms["aux"]
        terms["total"] = total
        return terms
