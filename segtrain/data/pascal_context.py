"""PASCAL-Context, 59 classes (background ignored) or 60 (background as a class).

Mottaghi et al., "The Role of Context for Object Detection and Semantic Segmentation in the
Wild", CVPR 2014: whole-scene labels of 459 classes for the 10,103 VOC 2010 train/val
images, of which the 59 most frequent are the benchmark (FCN, DeepLab v2 Table 6, CPNet,
SPNet). The split is VOC 2010's ``ImageSets/Main``: 4,998 train / 5,105 val.

The annotations are read in the form the authors distribute them
(cs.stanford.edu/~roozbeh/pascal-context/): ``trainval.tar.gz`` with one
``trainval/<id>.mat`` per image (``LabelMap``, indices into the 459-class ``labels.txt``)
and the 59-class list ``59_labels.txt``; not the Detail API's ``trainval_merged.json``.
``scripts/prepare_pascal_context.py`` converts them once into label PNGs beside the VOC
images, and this module reads::

    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/ImageSets/Main/{train,val}.txt               4,998 / 5,105 ids
    VOCdevkit/VOC2010/SegmentationClassContext/<id>.png            0..59, written once:
        0 = background (unlabelled pixels and the 400 classes outside the 59),
        1..59 = CLASS_NAMES_59 in order

``classes=59`` ignores background (0 -> 255, 1..59 -> 0..58), the setting of FCN and of
PyTorch-Encoding's ``pcontext``; ``classes=60`` keeps it as class 0 (DeepLab v2, "59 classes
plus background"). ``root`` may be ``VOC2010``, ``VOCdevkit`` or the folder above.
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
    read_image,
    read_label,
    read_list_file,
    remap_labels,
    require_root,
    require_split,
    unique_names,
    voc_colormap,
)

# The 59 classes under their names in labels.txt, in the order of their labels.txt indices
# (alphabetical), the class order of the Detail API, PyTorch-Encoding and mmsegmentation.
CLASS_NAMES_59 = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood")
BACKGROUND = "background"
CLASSES = (59, 60)
# No official palette: the VOC bit pattern of the label index written by the preparation
# (0 = background), so a class keeps its colour in both variants.
PALETTE_60 = voc_colormap(60)
SPLIT_SIZES = {"train": 4998, "val": 5105}
SPLITS = tuple(SPLIT_SIZES)
LABEL_DIR = "SegmentationClassContext"

LAYOUT = ("VOCdevkit/VOC2010/JPEGImages/<id>.jpg, VOCdevkit/VOC2010/ImageSets/Main/"
          "{train,val}.txt and the converted labels VOCdevkit/VOC2010/"
          f"{LABEL_DIR}/<id>.png (0..59)")
HOW_TO_GET = ("Download VOCtrainval_03-May-2010.tar (host.robots.ox.ac.uk/pascal/VOC/voc2010/) "
              "and, from https://cs.stanford.edu/~roozbeh/pascal-context/, trainval.tar.gz "
              "(trainval/*.mat and the 459-class labels.txt) and 59_labels.txt; then run "
              "once: python scripts/prepare_pascal_context.py --voc <dir>/VOCdevkit/VOC2010 "
              "--context <folder with trainval/, labels.txt, 59_labels.txt>")


def class_names(classes: int) -> tuple[str, ...]:
    """The class names of the 59- or 60-class variant (60: background first)."""
    if classes not in CLASSES:
        raise DatasetError(f"pascal_context: dataset.classes={classes}, expected 59 (background "
                           f"ignored) or 60 (background as class 0)")
    return CLASS_NAMES_59 if classes == 59 else (BACKGROUND, *CLASS_NAMES_59)


def find_voc2010_root(root: str | Path) -> Path:
    """Accept VOC2010 itself, VOCdevkit, or the folder holding VOCdevkit."""
    base = require_root(root, "pascal_context", LAYOUT, HOW_TO_GET)
    for candidate in (base, base / "VOC2010", base / "VOCdevkit" / "VOC2010"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(f"pascal_context: no JPEGImages folder under {base} (looked in {base}, "
                       f"{base / 'VOC2010'}, {base / 'VOCdevkit' / 'VOC2010'}). Expected layout: "
                       f"{LAYOUT}. {HOW_TO_GET}")


def split_ids(voc: Path, split: str) -> list[str]:
    """The ids of VOC 2010's ``ImageSets/Main/<split>.txt``."""
    list_file = voc / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"pascal_context: split list not found: {list_file}. Expected layout: "
                           f"{LAYOUT}. {HOW_TO_GET}")
    return unique_names(r[0] for r in read_list_file(list_file, "pascal_context", split))


class PascalContext(SegmentationDataset):
    """PASCAL-Context: train (4,998) and val (5,105); 59 or 60 classes."""

    name = "pascal_context"

    def __init__(self, root: str | Path, split: str = "train", classes: int = 59,
                 transforms=None, ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        require_split("pascal_context", split, SPLITS)
        self.class_names = class_names(classes)
        self.palette = PALETTE_60[1:] if classes == 59 else PALETTE_60
        self.root = find_voc2010_root(root)
        self.split = split
        self.label_dir = self.root / LABEL_DIR
        if not self.label_dir.is_dir():
            raise DatasetError(f"pascal_context: label folder not found: {self.label_dir}; the "
                               f"Context annotations are converted once with: python "
                               f"scripts/prepare_pascal_context.py --voc {self.root} --context "
                               f"<folder with trainval/, labels.txt, 59_labels.txt>")
        self.ids = split_ids(self.root, split)
        for folder, suffix, what in ((self.root / "JPEGImages", ".jpg", "images"),
                                     (self.label_dir, ".png", "labels")):
            missing = [i for i in self.ids if not (folder / f"{i}{suffix}").is_file()]
            if missing:
                hint = (f"the VOC 2010 download is incomplete. {HOW_TO_GET}" if what == "images"
                        else f"run python scripts/prepare_pascal_context.py --voc {self.root} "
                             f"--context <folder> again (it keeps the PNGs already written)")
                raise DatasetError(f"pascal_context: {len(missing)} of the {len(self.ids)} "
                                   f"{split} {what} are missing from {folder} (e.g. "
                                   f"{missing[0]}{suffix}): {hint}")
        background = self.ignore_index if classes == 59 else 0
        offset = 1 if classes == 59 else 0
        self._lut = make_lut({0: background, **{k: k - offset for k in range(1, 60)}})

    def __len__(self) -> int:
        return len(self.ids)

    def item_names(self) -> list[str]:
        return list(self.ids)

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        name = self.ids[index]
        label_path = self.label_dir / f"{name}.png"
        mask = remap_labels(read_label(label_path), self._lut, label_path,
                            "0..59, as scripts/prepare_pascal_context.py writes them")
        return mask, {"name": name, "image_path": str(self.root / "JPEGImages" / f"{name}.jpg"),
                      "label_path": str(label_path)}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mask, meta = self.load_mask(index)
        return read_image(meta["image_path"]), mask, meta
