"""The CRF processes' side of scripts/crf_search.py (a grid search of the dense CRF's
appearance kernel): they are spawned, so what they run must be importable from the package,
and they read the cached probabilities once from the file the search writes."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch

from segtrain.eval.crf import DenseCRF, crf_labels
from segtrain.eval.metrics import ConfusionMatrix

# the cached predictions of this CRF process: probs, rgb, mask, num_classes, ignore_index
_CACHE: dict[str, Any] = {}


def load_cache(path: str) -> None:
    """The pool's initializer: read the cache the search wrote to ``path``."""
    with open(path, "rb") as f:
        _CACHE.update(pickle.load(f))  # the file this search has just written


def crf_matrix(job: tuple[int, DenseCRF, int]) -> tuple[int, np.ndarray]:
    """One grid point on one cached image -> (point, its confusion matrix, rows: truth)."""
    point, crf, i = job
    labels = crf_labels(crf, _CACHE["rgb"][i], _CACHE["probs"][i])
    counts = ConfusionMatrix(_CACHE["num_classes"], _CACHE["ignore_index"])
    counts.update(torch.from_numpy(labels), torch.from_numpy(_CACHE["mask"][i]))
    return point, counts.matrix.numpy()
