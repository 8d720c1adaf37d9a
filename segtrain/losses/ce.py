"""Pixel-wise cross-entropy (DeepLab v2 Sec. 4: "the sum of cross-entropy terms for each
spatial position"), with ignore index, optional class weights (SegNet Sec. 4.1, median
frequency balancing, Eigen & Fergus 2015), an auxiliary term (PSPNet Sec. 3.3: weight 0.4),
and optionally U-Net's weight map (Ronneberger et al. 2015, Eq. 2; losses/unet_weights.py).

The U-Net map is computed here, from the batch's final masks on the CPU: it depends on the
geometry after every augmentation (elastic deformation, crops), needs no change to the
dataset items or to collate, and works for every dataset. Its cost (one distance transform
per connected object) suits U-Net's data; it is off by default.

Two DeepLab v2 training details (Sec. 4.1 and the released train prototxts):

- ``label_stride``: the loss compares the logits *before* the final upsampling
  (``"out_lowres"``) with the label subsampled to their size, as the Caffe models do (an
  ``Interp`` layer shrinks the label by 8, the logits are not upsampled), instead of the
  upsampled logits with the full label.
- multi-scale inputs (``segtrain.models.msc``): each scale's output
  (``outputs["scales"][scale]``, its ``"out"`` or ``"out_lowres"``) adds its own
  cross-entropy against the label resized to that output's size (terms ``ce_s1``,
  ``ce_s0.75``, ...); ``ce`` is then the term of the max-fused output.

Labels are resized by nearest neighbour (``label_grid``): ``aligned`` (default) on the
aligned-corners grid, output position i reads input position round(i * (H - 1) / (h - 1)):
for H = 8k + 1 (321 -> 41) that is every 8th label, exactly what Caffe's ``Interp`` with
``shrink_factor: 8`` samples (DeepLab). ``floor`` reads floor(i * H / h), PyTorch's
``F.interpolate(mode="nearest")``, which HANet's reference applies to its auxiliary labels
(``network/deepv3.py``: ``aux_gts`` interpolated ``mode='nearest'``).

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

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.losses.unet_weights import unet_weight_map

#: loss.normalization: divide the weighted sum by the valid pixels' weights, or their count
NORMALIZATIONS = ("weight_sum", "valid_count")
#: loss.label_grid: where a resized label reads the full one (module docstring)
LABEL_GRIDS = ("aligned", "floor")


def resize_labels(mask: torch.Tensor, size: Sequence[int],
                  grid: str = "aligned") -> torch.Tensor:
    """Nearest-neighbour resize of an (N, H, W) label map: ``grid="aligned"`` on the
    aligned-corners grid (Caffe's ``Interp``), ``"floor"`` as ``F.interpolate(mode="nearest")``."""
    if grid not in LABEL_GRIDS:
        raise ConfigError(f"loss.label_grid must be one of {', '.join(LABEL_GRIDS)}, got {grid!r}")
    h, w = int(size[0]), int(size[1])
    H, W = mask.shape[-2:]
    if (h, w) == (H, W):
        return mask

    def index(n_out: int, n_in: int) -> torch.Tensor:
        pos = torch.arange(n_out, dtype=torch.float64, device=mask.device)
        if grid == "floor":
            return torch.floor(pos * n_in / n_out).long().clamp(max=n_in - 1)
        if n_out == 1:
            return torch.zeros(1, dtype=torch.long, device=mask.device)
        return torch.round(pos * (n_in - 1) / (n_out - 1)).long()

    return mask[..., index(h, H), :][..., index(w, W)]


class CrossEntropyLoss(nn.Module):
    """``(outputs, batch) -> {"ce", ["ce_s<scale>", ...] ["aux",] "total"}``.

    Args:
        ignore_index: label excluded from the loss (255).
        class_weights: one weight per class, or None. (``median_freq`` is resolved to a
            list by the app from the dataset's statistics before this is built.)
        aux_weight: weight of the ``"aux"`` output's cross-entropy when the model returns one.
        label_stride: None: the upsampled ``"out"`` against the full label. An integer
            (DeepLab's Caffe models: 8): ``"out_lowres"``, which must be ceil(H / stride) x
            ceil(W / stride), against the label subsampled to that size.
        unet_weight_map: ``{w0, sigma, background}`` for U-Net's Eq. 2 weight map, or None.
            The main term is then sum(w(x) * CE(x)) / (number of labelled pixels).
        normalization: what the class-weighted sum sum_i w_{y_i} CE_i over the non-ignored
            pixels is divided by. ``weight_sum``: sum_i w_{y_i}, PyTorch's weighted mean
            (``F.cross_entropy(weight=...)``). ``valid_count``: the number of non-ignored
            pixels, Caffe's SoftmaxWithLoss with ``weight_by_label_freqs`` (the SegNet
            reference, caffe-segnet softmax_loss_layer.cpp: loss / count, normalize true).
        label_grid: where a label resized to a smaller output (``label_stride``, the
            ``"aux"`` output, multi-scale outputs) reads the full label: ``aligned``
            (Caffe's ``Interp``, DeepLab) or ``floor`` (``F.interpolate(mode="nearest")``,
            the HANet reference's auxiliary labels).
            Without class weights both are the plain mean.
    ``required_keys``: ``{"out"}``, or ``{"out_lowres"}`` with ``label_stride``; ``"aux"`` and
    the multi-scale outputs are used when present.
    """

    required_keys = frozenset({"out"})

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4, label_stride: int | None = None,
                 unet_weight_map: Mapping[str, float] | None = None,
                 normalization: str = "weight_sum", label_grid: str = "aligned") -> None:
        super().__init__()
        if label_grid not in LABEL_GRIDS:
            raise ConfigError(f"loss.label_grid must be one of {', '.join(LABEL_GRIDS)}, got "
                              f"{label_grid!r}")
        self.label_grid = label_grid
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"loss.normalization must be one of {', '.join(NORMALIZATIONS)}, "
                              f"got {normalization!r}")
        self.normalization = normalization
        if label_stride is not None and (int(label_stride) != label_stride or label_stride < 1):
            raise ConfigError(f"loss.label_stride must be null or a positive integer, got "
                              f"{label_stride!r}")
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.label_stride = None if label_stride is None else int(label_stride)
        self.key = "out" if label_stride is None else "out_lowres"
        if label_stride is not None:
            self.required_keys = frozenset({self.key})
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

    def _check_classes(self, logits: torch.Tensor) -> None:
        if self.weight is not None and self.weight.numel() != logits.shape[1]:
            raise ValueError(f"loss.class_weights has {self.weight.numel()} entries but the "
                             f"model predicts {logits.shape[1]} classes")

    def _weighted_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy of the non-ignored pixels, normalised as configured."""
        # float32 for the softmax even under autocast
        if self.normalization == "weight_sum":
            return F.cross_entropy(logits.float(), target, weight=self.weight,
                                   ignore_index=self.ignore_index)
        total = F.cross_entropy(logits.float(), target, weight=self.weight,
                                ignore_index=self.ignore_index, reduction="sum")
        return total / (target != self.ignore_index).sum().clamp(min=1)

    def _ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self._check_classes(logits)
        return self._weighted_ce(logits, target)

    def _unet_ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        masks = target.detach().cpu().numpy()
        weights = np.stack([unet_weight_map(m, ignore_index=self.ignore_index, **self.unet_map)
                            for m in masks])
        weights = torch.from_numpy(weights).to(logits.device)
        ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index,
                             reduction="none")
        valid = (target != self.ignore_index).sum().clamp(min=1)
        return (weights * ce).sum() / valid

    def _main_logits(self, outputs: dict[str, torch.Tensor],
                     mask: torch.Tensor) -> torch.Tensor:
        if self.key not in outputs:
            raise ConfigError(
                f"loss.label_stride={self.label_stride} needs the logits before the final "
                f"upsampling, but the model returns only {sorted(outputs)} (no "
                f"'out_lowres'); use loss.label_stride=null with this model")
        logits = outputs[self.key]
        if self.label_stride is not None:
            expected = tuple(math.ceil(n / self.label_stride) for n in mask.shape[-2:])
            if tuple(logits.shape[-2:]) != expected:
                raise ConfigError(
                    f"loss.label_stride={self.label_stride}: labels of size "
                    f"{tuple(mask.shape[-2:])} shrink to {expected}, but the model's "
                    f"'out_lowres' is {tuple(logits.shape[-2:])}; set loss.label_stride to "
                    f"the model's output stride")
        return logits

    def segmentation_terms(self, outputs: dict[str, torch.Tensor],
                           mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({"ce", ["ce_s<scale>", ...] ["aux"]}, their weighted sum)``: the part every loss
        shares."""
        logits = self._main_logits(outputs, mask)
        target = resize_labels(mask, logits.shape[-2:], self.label_grid)
        main = self._ce if self.unet_map is None else self._unet_ce
        terms = {"ce": main(logits, target)}
        total = terms["ce"]
        for scale, scale_outputs in outputs.get("scales", {}).items():
            scale_logits = scale_outputs[self.key]
            name = f"ce_s{scale:g}"
            terms[name] = self._ce(scale_logits, resize_labels(mask, scale_logits.shape[-2:],
                                                               self.label_grid))
            total = total + terms[name]
        if "aux" in outputs and self.aux_weight > 0:
            terms["aux"] = self._ce(outputs["aux"],
                                   resize_labels(mask, outputs["aux"].shape[-2:],
                                                 self.label_grid))
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
        normalization: as ``CrossEntropyLoss`` (over the kept pixels).
        label_grid: as ``CrossEntropyLoss``.
    """

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4, thresh: float = 0.7, min_kept: int = 100000,
                 normalization: str = "weight_sum", label_grid: str = "aligned") -> None:
        super().__init__(ignore_index, class_weights, aux_weight, normalization=normalization,
                         label_grid=label_grid)
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
        return self._weighted_ce(logits, mined)
