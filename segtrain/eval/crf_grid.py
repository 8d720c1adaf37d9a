"""The CRF processes' side of scripts/crf_search.py (a grid search of the dense CRF's
appearance kernel): they are spawned, so what they run must be importable from the package,
and they read the cached probabilities once from the file the search writes."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from segtrain.eval.crf import DenseCRF, crf_labels

# the cached predictions of this CRF process: probs, rgb, mask, num_classes, ignore_index
_CACHE: dict[str, Any] = {}


def load_cache(path: str) -> None:
    """The pool's initializer: read the cache the search wrote to ``path``."""
    with open(path, "rb") as f:
        _CACHE.update(pickle.load(f))  # the file this search has just written


def matrix(labels: np.ndarray, mask: np.ndarray, n: int, ignore_index: int) -> np.ndarray:
    """The n x n confusion matrix (rows: truth) of one label map, ignored pixels left out."""
    keep = mask != ignore_index
    return np.bincount(n * mask[keep].astype(np.int64) + labels[keep].astype(np.int64),
                       minlength=n * n).reshape(n, n)


def crf_matrix(job: tuple[int, DenseCRF, int]) -> tuple[int, np.ndarray]:
    """One grid point on one cached image -> (point, its confusion matrix)."""
    point, crf, i = job
    labels = crf_labels(crf, _CACHE["rgb"][i], _CACHE["probs"][i])
    return point, matrix(labels, _CACHE["mask"][i], _CACHE["num_classes"],
                         _CACHE["ignore_index"])
