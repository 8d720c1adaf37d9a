"""Class statistics of a dataset: pixel counts and median-frequency class weights.

Median-frequency balancing (Eigen & Fergus, "Predicting Depth, Surface Normals and
Semantic Labels with a Common Multi-Scale Convolutional Architecture", ICCV 2015,
Sec. 4.2; used by SegNet on CamVid): ``w_c = median(freq) / freq_c`` where ``freq_c`` is
the number of pixels of class c divided by the total number of pixels of the images in
which c is present, and the median runs over the classes present.

``load_or_compute_class_weights`` caches the statistics as json (default
``~/.cache/segtrain/class_stats/``), named by dataset, split and a hash of its root, so
``loss.class_weights=median_freq`` costs one pass over the labels once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class ClassCounts:
    """Label statistics over a dataset (arrays indexed by class)."""

    pixels: np.ndarray        # pixels of class c
    image_pixels: np.ndarray  # all pixels (ignore included) of the images containing c
    images: np.ndarray        # number of images containing c
    ignored: int              # pixels with the ignore index
    num_images: int

    @property
    def frequencies(self) -> np.ndarray:
        """freq_c of Eigen & Fergus; 0 for a class that never occurs."""
        return np.divide(self.pixels, self.image_pixels, out=np.zeros(len(self.pixels)),
                         where=self.image_pixels > 0)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassCounts:
        return cls(pixels=np.asarray(data["pixels"], np.int64),
                   image_pixels=np.asarray(data["image_pixels"], np.int64),
                   images=np.asarray(data["images"], np.int64),
                   ignored=int(data["ignored"]), num_images=int(data["num_images"]))


class _MaskHistograms(Dataset):
    """Per-image label histograms (256 bins), computed from the raw masks, no augmentation."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        mask, meta = self.dataset.load_mask(index)
        self.dataset.check_labels(mask, str(meta.get("label_path", index)))
        return torch.from_numpy(np.bincount(np.asarray(mask, np.int64).ravel(), minlength=256))


def class_pixel_counts(dataset, num_workers: int = 0) -> ClassCounts:
    """Count the pixels of each class over ``dataset`` (its ``load_mask``; no transforms)."""
    num_classes, ignore = dataset.num_classes, dataset.ignore_index
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)
    images = np.zeros(num_classes, np.int64)
    ignored = 0
    loader = DataLoader(_MaskHistograms(dataset), batch_size=None, shuffle=False,
                        num_workers=num_workers)
    for hist in loader:
        hist = hist.numpy()
        per_class = hist[:num_classes]
        present = per_class > 0
        pixels += per_class
        image_pixels += present * hist.sum()
        images += present
        ignored += int(hist[ignore]) if ignore < len(hist) else 0
    return ClassCounts(pixels, image_pixels, images, ignored, len(dataset))


def median_frequency_weights(counts: ClassCounts) -> list[float]:
    """w_c = median(freq) / freq_c over the classes present; absent classes get 1.0."""
    freq = counts.frequencies
    present = freq > 0
    if not present.any():
        raise ValueError("no labelled pixels: cannot compute class weights")
    median = float(np.median(freq[present]))
    weights = np.ones(len(freq))
    weights[present] = median / freq[present]
    return weights.tolist()


def cache_path(dataset, cache_dir: str | Path | None = None) -> Path:
    """``<cache_dir>/<name>_<split>_<hash>.json``; the hash covers root, class and classes."""
    name = getattr(dataset, "name", type(dataset).__name__.lower())
    split = getattr(dataset, "split", "all")
    key = "|".join([type(dataset).__module__, type(dataset).__qualname__,
                    str(Path(str(getattr(dataset, "root", ""))).resolve()),
                    str(split), ",".join(dataset.class_names), str(len(dataset))])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    if cache_dir is None:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        cache_dir = base / "segtrain" / "class_stats"
    return Path(cache_dir) / f"{name}_{split}_{digest}.json"


def load_or_compute_stats(dataset, cache_dir: str | Path | None = None,
                          num_workers: int = 0, recompute: bool = False
                          ) -> tuple[ClassCounts, list[float], Path]:
    """Counts and median-frequency weights, read from the cache or computed and cached."""
    path = cache_path(dataset, cache_dir)
    if path.is_file() and not recompute:
        try:
            data = json.loads(path.read_text())
            if data.get("class_names") == list(dataset.class_names):
                return ClassCounts.from_json(data["counts"]), data["weights"], path
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale cache: recompute and overwrite
    counts = class_pixel_counts(dataset, num_workers=num_workers)
    weights = median_frequency_weights(counts)
    data = {"dataset": getattr(dataset, "name", type(dataset).__name__),
            "split": getattr(dataset, "split", None),
            "root": str(getattr(dataset, "root", "")),
            "class_names": list(dataset.class_names),
            "method": "median frequency (Eigen & Fergus 2015)",
            "counts": counts.to_json(), "weights": weights}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return counts, weights, path


def load_or_compute_class_weights(dataset, cache_dir: str | Path | None = None,
                                  num_workers: int = 0) -> list[float]:
    """Median-frequency class weights of ``dataset`` (cached); what the loss multiplies by."""
    return load_or_compute_stats(dataset, cache_dir, num_workers)[1]
