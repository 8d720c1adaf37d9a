"""U-Net's pixel-wise loss weight map (Ronneberger et al., MICCAI 2015, Sec. 3, Eq. 2):

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

with w_c the class-balancing map, d1 / d2 the distances to the border of the nearest and
second nearest cell; w0 = 10 and sigma = 5 pixels in the paper.

Choices for semantic masks (the paper has one foreground class of touching cells):
- "cells" are the connected components (4-connectivity, ``scipy.ndimage.label``) of every
  class except ``background`` and the ignore label; the distance of a pixel to a cell is
  the Euclidean distance to the cell's nearest pixel (``distance_transform_edt``);
- the border term is added on background pixels only, the separation lines between
  touching cells that the term exists for (a pixel inside a cell has distance 0 to it);
  with fewer than two cells there is no border term;
- w_c gives every class present in the sample the same total weight:
  w_c(x) = n_valid / (n_classes_present * n_pixels_of_class(x)), so its mean over the
  labelled pixels is 1; ignored pixels weigh 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def class_balance_map(mask: np.ndarray, ignore_index: int) -> np.ndarray:
    """w_c of one HxW label mask (see the module docstring)."""
    valid = mask != ignore_index
    weights = np.zeros(mask.shape, np.float32)
    if not valid.any():
        return weights
    classes, counts = np.unique(mask[valid], return_counts=True)
    per_class = valid.sum() / (len(classes) * counts.astype(np.float64))
    lookup = dict(zip(classes.tolist(), per_class.tolist()))
    for c, w in lookup.items():
        weights[mask == c] = w
    return weights


def border_distances(mask: np.ndarray, ignore_index: int,
                     background: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(d1, d2): distances to the nearest and second nearest cell; None with < 2 cells."""
    cells, total = [], 0
    for c in np.unique(mask):
        if c in (background, ignore_index):
            continue
        labels, n = ndimage.label(mask == c)
        cells.extend(labels == i for i in range(1, n + 1))
        total += n
    if total < 2:
        return None
    d1 = np.full(mask.shape, np.inf)
    d2 = np.full(mask.shape, np.inf)
    for cell in cells:
        d = ndimage.distance_transform_edt(~cell)
        d2 = np.where(d < d1, d1, np.minimum(d2, d))
        d1 = np.minimum(d1, d)
    return d1, d2


def unet_weight_map(mask: np.ndarray, w0: float, sigma: float, ignore_index: int = 255,
                    background: int = 0) -> np.ndarray:
    """Eq. 2 for one HxW label mask; float32, 0 on ignored pixels."""
    weights = class_balance_map(mask, ignore_index)
    distances = border_distances(mask, ignore_index, background)
    if distances is not None:
        d1, d2 = distances
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
        weights += np.where(mask == background, border, 0.0).astype(np.float32)
    return weights
