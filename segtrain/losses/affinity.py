"""The loss of CPNet (Yu, Wang, Gao, Yu, Shen and Sang, "Context Prior for Scene
Segmentation", CVPR 2020, sections "Affinity Loss" and "Network Architecture").

Total ("Network Architecture"): ``L = lambda_s L_s + lambda_a L_a + lambda_p L_p`` with the
segmentation cross-entropy L_s (lambda_s = 1), the auxiliary cross-entropy L_a (lambda_a =
0.4) and the affinity loss ``L_p = lambda_u L_u + lambda_g L_g`` (lambda_p = lambda_u =
lambda_g = 1, the paper's values and the official code's ``loss_weight=1.0`` on ``unary +
global``).

- Ideal affinity map ("Affinity Loss"): the label is downsampled (nearest) to the prior's h
  x w grid, one-hot encoded to L (N x C) and ``A = L L^T`` (N x N): A_ij = 1 iff pixels i
  and j have the same class. Here a pixel whose label is ``ignore_index`` has no class: its
  row and column of A and P are left out of every term (the official code instead treats
  ignore as one more class).
- Unary term: binary cross-entropy of P against A, averaged over the valid (i, j) pairs,
  the diagonal (a position with itself) included.
- Global term: for every valid row i, intra-class precision ``sum_j a_ij p_ij / sum_j p_ij``,
  intra-class recall ``sum_j a_ij p_ij / sum_j a_ij`` and inter-class specificity
  ``sum_j (1 - a_ij)(1 - p_ij) / sum_j (1 - a_ij)``, each entering as -log and averaged
  over the rows. Rows are taken along P's second axis, the positions a row of P aggregates
  (the official code's ``dim=2``). As the official code (``loss/affinity_loss.py``), the
  diagonal j = i is left out of both sums over ``a_ij p_ij`` and out of recall's
  denominator; precision's denominator keeps every p_ij (``include_diagonal=True`` keeps
  the diagonal everywhere, the paper's formulas read literally). Specificity never sees
  the diagonal (a_ii = 1). So even the ideal prior P = A has precision (n - 1) / n in a
  class of n positions; with the diagonal the global term is zero there.
- A position alone in its class (no other position of its class on the grid) has neither
  recall nor precision (0 / 0): here both terms are zero for that row. The official code
  replaces the zero denominator by 1, so both ratios are 0 and its BCE's log clamp makes
  each term -log(0) -> 100: a constant 200 per lone row in the sum (no gradient), which
  the mean over rows spreads over the loss value. The gradient is the same in both.
  Likewise a row with no position of another class has no specificity; its term is zero
  (the official code: 100).

Logs are of probabilities clamped to [1e-6, 1 - 1e-6] (at most 13.8 per term; the official
BCE clamps the log at -100). The terms are ``{"ce", ["aux",] "unary", "global", "total"}``;
class weights and the auxiliary weight are those of ``CrossEntropyLoss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segtrain.errors import ConfigError
from segtrain.losses.ce import CrossEntropyLoss

EPS = 1e-6


def ideal_affinity(mask: torch.Tensor, size: Sequence[int],
                   ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, valid)``: A (B x N x N, float) from ``mask`` (B x H x W) at ``size`` = (h, w),
    and the valid positions (B x N, bool). Rows and columns of ignored positions are zero."""
    small = F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")
    labels = small[:, 0].long().flatten(1)  # B x N
    valid = labels != ignore_index
    # L L^T with L the one-hot labels: 1 where the two classes are equal
    same = labels[:, :, None] == labels[:, None, :]
    pairs = valid[:, :, None] & valid[:, None, :]
    return (same & pairs).float(), valid


def affinity_terms(prior: torch.Tensor, affinity: torch.Tensor, valid: torch.Tensor,
                   include_diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unary, global)`` ("Affinity Loss") of a prior P against an ideal map A, over the
    valid positions only; ``include_diagonal`` keeps j = i in the global term's sums."""
    p = prior.float()
    a = affinity
    pairs = (valid[:, :, None] & valid[:, None, :]).float()
    q = p.clamp(EPS, 1.0 - EPS)
    bce = -(a * q.log() + (1.0 - a) * (1.0 - q).log())
    unary = (bce * pairs).sum() / pairs.sum().clamp_min(1.0)

    same = a * pairs  # a_ij over valid pairs
    if not include_diagonal:
        same = same * (1.0 - torch.eye(a.shape[-1], device=a.device, dtype=a.dtype))
    tp = (same * p).sum(-1)
    n_same = same.sum(-1)
    predicted = (p * pairs).sum(-1)
    other = ((1.0 - a) * pairs).sum(-1)
    tn = ((1.0 - a) * (1.0 - p) * pairs).sum(-1)

    def neg_log(ratio: torch.Tensor, defined: torch.Tensor) -> torch.Tensor:
        return torch.where(defined, -ratio.clamp(EPS, 1.0).log(), torch.zeros_like(ratio))

    has_same = n_same > 0
    per_row = (neg_log(tp / predicted.clamp_min(EPS), has_same)
               + neg_log(tp / n_same.clamp_min(EPS), has_same)
               + neg_log(tn / other.clamp_min(EPS), other > 0))
    rows = valid.float()
    global_ = (per_row * rows).sum() / rows.sum().clamp_min(1.0)
    return unary, global_


class AffinityLoss(CrossEntropyLoss):
    """CE + aux CE + CPNet's affinity loss on the ``prior`` output.

    Args:
        ignore_index: label excluded from every term (255).
        class_weights: one weight per class for the cross-entropy terms, or None.
        aux_weight: lambda_a (0.4).
        prior_size: (h, w) of the model's prior grid (``model.prior_size``).
        unary_weight: lambda_p * lambda_u (1).
        global_weight: lambda_p * lambda_g (1).
        include_diagonal: keep j = i in the global term (``False``: the official code).
    """

    required_keys = frozenset({"out", "prior"})

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None,
                 aux_weight: float = 0.4, prior_size: Sequence[int] | None = None,
                 unary_weight: float = 1.0, global_weight: float = 1.0,
                 include_diagonal: bool = False) -> None:
        super().__init__(ignore_index, class_weights, aux_weight)
        self.include_diagonal = include_diagonal
        self.prior_size = None if prior_size is None else tuple(int(s) for s in prior_size)
        self.unary_weight, self.global_weight = unary_weight, global_weight

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        target = batch["mask"]
        terms, total = self.segmentation_terms(outputs, target)
        prior = outputs["prior"]
        n = prior.shape[-1]
        if self.prior_size is None or self.prior_size[0] * self.prior_size[1] != n:
            raise ConfigError(f"loss.prior_size={self.prior_size} does not match the model's "
                              f"prior map of {n} positions; set it to model.prior_size")
        affinity, valid = ideal_affinity(target, self.prior_size, self.ignore_index)
        terms["unary"], terms["global"] = affinity_terms(prior, affinity, valid,
                                                         self.include_diagonal)
        terms["total"] = (total + self.unary_weight * terms["unary"]
                          + self.global_weight * terms["global"])
        return terms
