"""Class-uniform sampling: a share of each epoch's crops placed on a class drawn uniformly.

The sampling of NVIDIA's semantic-segmentation code that HANet trains with (Choi et al.,
CVPR 2020; shachoi/HANet datasets/uniform.py and datasets/cityscapes.py
``CityScapesUniform``, ``--class_uniform_pct`` / ``--class_uniform_tile``):

1. The class index, built once per dataset and split: every image is cut into
   ``tile`` x ``tile`` tiles; for each class present in a tile, the centroid of its pixels
   there (centre of mass, truncated to whole pixels) is recorded. The reference keeps only
   whole tiles (``image_size // tile``), which leaves images smaller than a tile without
   centroids; here the last, partial tile of each row and column counts too (identical on
   Cityscapes' 1024x2048 frames with tile 1024).
2. Each epoch of ``N`` samples (``uniform.build_epoch``): ``int(N * pct / num_classes)``
   crops per class, each at a centroid drawn from all of that class's centroids in the
   split (a shuffled pass over them, wrapping around), so every class gets the same number
   of crops however rare it is; the remaining samples are plain random crops of distinct
   images. A class absent from the split gets no crop; its slots become random crops (the
   reference drops them, making the epoch shorter). The epoch's list is then shuffled.
3. A centred sample passes its centroid to the crop (``transforms.RandomCrop``),
   which places the window at a uniformly random offset among those that contain the
   centroid (``joint_transforms.RandomCrop`` with a centroid), after the random scale.

Randomness follows the loader's contract: epoch ``e``'s list is a function of
``(seed, e)`` and sample ``p`` of the stream is entry ``p mod N`` of epoch ``p // N``, so a
resumed run sees exactly the samples of an uninterrupted one.

The index is cached as json in ``<dataset root>/.segtrain_cache/class_uniform/`` (a
read-only root: ``$XDG_CACHE_HOME/segtrain/class_uniform/``, default ``~/.cache``), in a
file named by dataset, split, tile and a hash of the root, the split's image list, the
classes and the tile; a cache that does not match or cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from segtrain.data.transforms import RandomCrop
from segtrain.errors import ConfigError, UserError

log = logging.getLogger("segtrain")

FORMAT = 1  # of the cache file; a file of another format is rebuilt
CACHE_FOLDER = Path(".segtrain_cache") / "class_uniform"

#: one image's index: class id -> centroids [[x, y], ...] in the image as ``load`` reads it
ImageCentroids = dict[int, list[list[int]]]


def tile_centroids(mask: np.ndarray, tile: int, num_classes: int) -> ImageCentroids:
    """The centroid of each class in each ``tile`` x ``tile`` tile of ``mask`` (train ids;
    values >= ``num_classes``, the ignore index, count nowhere), as ``[x, y]`` pixels."""
    height, width = mask.shape[:2]
    out: ImageCentroids = {}
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            patch = np.asarray(mask[y0:y0 + tile, x0:x0 + tile], np.int64)
            rows, cols = np.indices(patch.shape)
            keep = patch < num_classes
            labels = patch[keep]
            count = np.bincount(labels, minlength=num_classes)
            sum_y = np.bincount(labels, weights=rows[keep], minlength=num_classes)
            sum_x = np.bincount(labels, weights=cols[keep], minlength=num_classes)
            for c in np.flatnonzero(count):
                centroid = [x0 + int(sum_x[c] / count[c]), y0 + int(sum_y[c] / count[c])]
                out.setdefault(int(c), []).append(centroid)
    return out


class _ImageCentroids(Dataset):
    """Per-image centroids from the raw masks (``load_mask``: no image, no augmentation)."""

    def __init__(self, dataset, tile: int) -> None:
        self.dataset, self.tile = dataset, tile

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ImageCentroids:
        mask, meta = self.dataset.load_mask(index)
        self.dataset.check_labels(mask, str(meta.get("label_path", index)))
        return tile_centroids(mask, self.tile, self.dataset.num_classes)


def build_index(dataset, tile: int, num_workers: int = 0) -> list[ImageCentroids]:
    """The class index of ``dataset``: one ``{class: centroids}`` per image, in index order."""
    loader = DataLoader(_ImageCentroids(dataset, tile), batch_size=None, shuffle=False,
                        num_workers=num_workers, collate_fn=lambda item: item)
    return list(loader)


def cache_key(dataset, tile: int) -> dict[str, Any]:
    """What the index depends on: dataset, root, split, its image list, classes, tile."""
    names = dataset.item_names()
    root = getattr(dataset, "root", None)
    return {"format": FORMAT, "dataset": type(dataset).__module__ + "." +
            type(dataset).__qualname__,
            "root": None if root is None else str(Path(str(root)).resolve()),
            "split": str(getattr(dataset, "split", "")), "tile": int(tile),
            "class_names": list(dataset.class_names), "ignore_index": dataset.ignore_index,
            "images": len(names),
            "image_list_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest()}


def cache_file_name(dataset, key: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{dataset.name}_{key['split']}_tile{key['tile']}_{digest}.json"


def user_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "segtrain" / "class_uniform"


def cache_dirs(dataset, cache_dir: str | Path | None = None) -> list[Path]:
    """Where the index is looked for and written, in order: ``cache_dir`` when given, else
    the dataset root's cache folder, then the user's cache folder."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    root = getattr(dataset, "root", None)
    dirs = [] if root is None else [Path(str(root)) / CACHE_FOLDER]
    return dirs + [user_cache_dir()]


def _read(path: Path, key: dict[str, Any]) -> list[ImageCentroids] | None:
    """The index in ``path`` if the file is whole and was built for ``key``, else None."""
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            log.warning("class-uniform index %s was built for other data; rebuilding", path)
            return None
        images = [{int(c): [[int(x), int(y)] for x, y in points]
                   for c, points in image.items()} for image in data["images"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("class-uniform index %s cannot be read (%s); rebuilding", path,
                    type(err).__name__)
        return None
    if len(images) != key["images"]:
        log.warning("class-uniform index %s is incomplete; rebuilding", path)
        return None
    return images


def _write(path: Path, key: dict[str, Any], images: list[ImageCentroids]) -> None:
    """Write atomically (a temporary file renamed), so a kill leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "images": [
            {str(c): points for c, points in image.items()} for image in images]}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_build_index(dataset, tile: int, num_workers: int = 0,
                        cache_dir: str | Path | None = None
                        ) -> tuple[list[ImageCentroids], Path]:
    """The class index of ``dataset`` (see the module docstring), from the first cache folder
    that holds a valid one, else built and written to the first folder that takes it."""
    key = cache_key(dataset, tile)
    name = cache_file_name(dataset, key)
    folders = cache_dirs(dataset, cache_dir)
    for folder in folders:
        images = _read(folder / name, key)
        if images is not None:
            return images, folder / name
    log.info("class-uniform sampling: building the class index of %s %s (%d images, tile "
             "%d)", dataset.name, key["split"], key["images"], tile)
    images = build_index(dataset, tile, num_workers)
    for folder in folders:
        try:
            _write(folder / name, key, images)
            return images, folder / name
        except OSError as err:  # a read-only dataset root: the next folder
            log.info("class-uniform index: cannot write in %s (%s)", folder, err.strerror)
    raise UserError(f"class-uniform sampling: cannot write its class index in "
                    f"{' or '.join(map(str, folders))}; set XDG_CACHE_HOME to a writable folder")


@dataclass(frozen=True)
class Centroid:
    """A class-uniform sample's class and its centroid (pixels of the image as read)."""

    class_id: int
    x: int
    y: int


class ClassUniformPlan:
    """The epochs of class-uniform sampling over an index (see the module docstring).

    Args:
        index: one ``{class: centroids}`` per image (``load_or_build_index``).
        pct: share of each epoch's samples centred on a class (``dataset.class_uniform.pct``).
        num_classes: the dataset's classes; each gets ``int(N * pct / num_classes)`` crops.
    """

    def __init__(self, index: list[ImageCentroids], pct: float, num_classes: int) -> None:
        self.length = len(index)
        self.pct, self.num_classes = float(pct), int(num_classes)
        # every centroid of class c in the split, as rows (image, x, y), in index order
        pools: dict[int, list[tuple[int, int, int]]] = {}
        for image, centroids in enumerate(index):
            for c, points in centroids.items():
                pools.setdefault(int(c), []).extend((image, x, y) for x, y in points)
        self.pools = {c: np.asarray(pools[c], np.int64) for c in sorted(pools)
                      if c < self.num_classes}
        self.per_class = int(self.length * self.pct / self.num_classes)

    @property
    def centred_per_epoch(self) -> int:
        return self.per_class * len(self.pools)

    def describe(self) -> str:
        return (f"{self.per_class} crops per class x {len(self.pools)} classes present + "
                f"{self.length - self.centred_per_epoch} random crops per epoch of "
                f"{self.length}")

    def epoch(self, seed: int, epoch: int) -> list[tuple[int, Centroid | None]]:
        """Epoch ``epoch``'s samples in order: ``(image index, centroid or None)``."""
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,)))
        plain = rng.permutation(self.length)[:self.length - self.centred_per_epoch]
        samples: list[tuple[int, Centroid | None]] = [(int(i), None) for i in plain]
        for c, pool in self.pools.items():
            order = rng.permutation(len(pool))
            for k in range(self.per_class):
                image, x, y = pool[order[k % len(pool)]]
                samples.append((int(image), Centroid(c, int(x), int(y))))
        return [samples[i] for i in rng.permutation(len(samples))]


def class_uniform_plan(dataset, pct: float | None, tile: int, num_workers: int = 0,
                       cache_dir: str | Path | None = None) -> ClassUniformPlan | None:
    """``dataset.class_uniform``'s plan for the training set; None when ``pct`` is off."""
    if not pct:
        return None
    if len(dataset) * pct / dataset.num_classes < 1:
        raise ConfigError(
            f"dataset.class_uniform.pct={pct}: {len(dataset)} images x {pct} / "
            f"{dataset.num_classes} classes gives no crop per class in an epoch "
            f"(int(N x pct / classes), as the reference); raise it or set it to null")
    if not hasattr(dataset, "item_names"):
        raise ConfigError(f"dataset.class_uniform.pct={pct}: the training set "
                          f"{type(dataset).__name__} is no segtrain SegmentationDataset "
                          f"(it lists no item_names to key the class index by)")
    crops = [t for t in getattr(dataset.transforms, "transforms", ())
             if isinstance(t, RandomCrop)]
    if not crops:
        raise ConfigError(f"dataset.class_uniform.pct={pct}: the training pipeline "
                          f"(dataset.train_transforms) has no crop that takes the centroid "
                          f"(segtrain.data.transforms.RandomCrop, the crop of "
                          f"dataset.augment when dataset.augment.crop_size is set)")
    index, path = load_or_build_index(dataset, tile, num_workers, cache_dir)
    plan = ClassUniformPlan(index, pct, dataset.num_classes)
    log.info("class-uniform sampling: %s (index %s)", plan.describe(), path)
    return plan


def as_keypoints(centroid: Centroid) -> np.ndarray:
    """The centroid as the one albumentations keypoint the crop reads (``xy`` format)."""
    return np.array([[centroid.x, centroid.y]], np.float32)
