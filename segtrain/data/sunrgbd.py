"""SUN RGB-D, 37 classes, in the layout of the widely used 37-class release.

Song et al., "SUN RGB-D: A RGB-D Scene Understanding Benchmark Suite", CVPR 2015; 5,285
train / 5,050 test images. The labels are those A. Handa extracted from SUNRGBD2Dseg.mat
(github.com/ankurhanda/sunrgbd-meta-data), the release that pytorch-semseg and most RGB-D
segmentation code read. Layout read unchanged (each archive extracted into its folder)::

    <root>/SUNRGBD-train_images/img-000001.jpg .. img-005285.jpg
    <root>/SUNRGBD-test_images/img-000001.jpg .. img-005050.jpg
    <root>/sunrgbd_train_test_labels/img-000001.png .. img-010335.png
        labels 0..37 (0 = unlabelled); img-000001..005050 are the test images in order,
        img-005051..010335 the train images (train image i has label i + 5050)
    <root>/sunrgbd_train_depth/1.png .. 5285.png   16-bit depth (dataset.use_depth=true)
    <root>/sunrgbd_test_depth/1.png .. 5050.png

The labels may also be split as ``labels/train/`` and ``labels/test/`` with the same file
names (the SceneNet instructions). Label 0 becomes the ignore index and 1..37 become 0..36.
With ``use_depth`` the image gets a fourth channel: depth scaled from 0..65535 to 0..255,
stacked as float32 after RGB (``in_channels`` is then 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segtrain.data.base import (
    IGNORE_INDEX,
    DatasetError,
    SegmentationDataset,
    make_lut,
    read_depth,
    read_image,
    read_label,
    remap_labels,
    require_nonempty,
    require_root,
    require_split,
    voc_colormap,
)

CLASS_NAMES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
               "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain",
               "dresser", "pillow", "mirror", "floor_mat", "clothes", "ceiling", "books",
               "fridge", "tv", "paper", "towel", "shower_curtain", "box", "whiteboard",
               "person", "night_stand", "toilet", "sink", "lamp", "bathtub", "bag")
# No official palette: the VOC bit pattern of the raw label index (1..37), as pytorch-semseg.
PALETTE = voc_colormap(38)[1:]
NUM_TEST = 5050
SPLIT_SIZES = {"train": 5285, "test": 5050}
SPLITS = ("train", "test")

LAYOUT = ("<root>/SUNRGBD-{train,test}_images/img-NNNNNN.jpg, labels "
          "<root>/sunrgbd_train_test_labels/img-NNNNNN.png (000001..005050 test, 005051..010335 "
          "train), depth <root>/sunrgbd_{train,test}_depth/N.png (only with use_depth=true)")
HOW_TO_GET = ("Download http://www.doc.ic.ac.uk/~ahanda/SUNRGBD-train_images.tgz, "
              "SUNRGBD-test_images.tgz, sunrgb_train_depth.tgz, sunrgb_test_depth.tgz and "
              "https://github.com/ankurhanda/sunrgbd-meta-data/raw/master/"
              "sunrgbd_train_test_labels.tar.gz; extract the image and label archives into "
              "folders of the same names (see docs/datasets.md)")

DEPTH_SCALE = 255.0 / 65535.0


class SUNRGBD(SegmentationDataset):
    """SUN RGB-D 37 classes: train (5,285) and test (5,050); ``use_depth`` adds depth."""

    class_names = CLASS_NAMES
    palette = PALETTE
    name = "sunrgbd"

    def __init__(self, root: str | Path, split: str = "train", use_depth: bool = False,
                 transforms=None, ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        require_split("sunrgbd", split, SPLITS)
        self.root = require_root(root, "sunrgbd", LAYOUT, HOW_TO_GET)
        self.split = split
        self.use_depth = bool(use_depth)
        image_dir = self.root / f"SUNRGBD-{split}_images"
        if not image_dir.is_dir():
            raise DatasetError(f"sunrgbd: image folder not found: {image_dir}. Expected "
                               f"layout: {LAYOUT}. {HOW_TO_GET}")
        self.images = sorted(image_dir.glob("img-*.jpg"), key=_number)
        require_nonempty(self.images, "sunrgbd", split, f"{image_dir}/img-*.jpg")
        self.label_dir = self._find_label_dir()
        self.depth_dir = self.root / f"sunrgbd_{split}_depth"
        if self.use_depth and not self.depth_dir.is_dir():
            raise DatasetError(f"sunrgbd: dataset.use_depth=true but the depth folder "
                               f"{self.depth_dir} does not exist. Expected layout: {LAYOUT}. "
                               f"{HOW_TO_GET}")
        self._lut = make_lut({0: self.ignore_index, **{i: i - 1 for i in range(1, 38)}})

    @property
    def in_channels(self) -> int:
        return 4 if self.use_depth else 3

    def _find_label_dir(self) -> Path:
        for folder in (self.root / "sunrgbd_train_test_labels", self.root / "labels" / self.split):
            if folder.is_dir():
                return folder
        raise DatasetError(f"sunrgbd: label folder not found: neither "
                           f"{self.root / 'sunrgbd_train_test_labels'} nor "
                           f"{self.root / 'labels' / self.split} exists. Expected layout: "
                           f"{LAYOUT}. {HOW_TO_GET}")

    def __len__(self) -> int:
        return len(self.images)

    def item_names(self) -> list[str]:
        return [path.name for path in self.images]

    def _paths(self, index: int) -> tuple[int, Path, Path]:
        image_path = self.images[index]
        number = _number(image_path)
        label_number = number + NUM_TEST if self.split == "train" else number
        return number, image_path, self.label_dir / f"img-{label_number:06d}.png"

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        number, image_path, label_path = self._paths(index)
        mask = remap_labels(read_label(label_path), self._lut, label_path,
                            "0..37 (0 = unlabelled)")
        meta = {"name": image_path.stem, "image_path": str(image_path),
                "label_path": str(label_path)}
        if self.use_depth:
            meta["depth_path"] = str(self.depth_dir / f"{number}.png")
        return mask, meta

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mask, meta = self.load_mask(index)
        image = read_image(meta["image_path"])
        if not self.use_depth:
            return image, mask, meta
        depth = read_depth(meta["depth_path"])
        if depth.shape != image.shape[:2]:
            raise DatasetError(f"sunrgbd: depth {meta['depth_path']} is "
                               f"{depth.shape[1]}x{depth.shape[0]} but image "
                               f"{meta['image_path']} is {image.shape[1]}x{image.shape[0]}")
        stacked = np.empty(image.shape[:2] + (4,), np.float32)
        stacked[..., :3] = image
        stacked[..., 3] = depth * np.float32(DEPTH_SCALE)
        return stacked, mask, meta


def _number(path: Path) -> int:
    """img-000123.jpg -> 123; names that do not fit are an error naming the file."""
    try:
        return int(path.stem.split("-")[-1])
    except ValueError as err:
        raise DatasetError(f"sunrgbd: unexpected file name {path} (expected img-NNNNNN.jpg)") \
            from err
