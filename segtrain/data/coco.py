"""COCO 2017 instances as semantic masks, all 80 categories or the 20 VOC ones.

Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014. DeepLab (Chen et al.,
TPAMI 2017, Sec. 4.1) pretrains on COCO restricted to the VOC categories before VOC;
``classes=voc`` gives that label set (background + the 20 VOC classes in VOC order),
``classes=all`` gives background + the 80 COCO categories in category-id order.
Layout read unchanged::

    <root>/annotations/instances_{train,val}2017.json
    <root>/{train,val}2017/<12-digit id>.jpg

Masks are rasterised on the fly with pycocotools (polygons and RLE). Rules:
- categories outside the chosen set are background;
- crowd regions (``iscrowd=1``) of a kept category are ignored (255), except where a
  non-crowd instance covers them;
- overlapping instances are painted largest first, so a smaller instance lies on top of
  a larger one (a person in front of a sofa keeps its pixels).
With ``cache=true`` each mask is written once as a PNG (atomically, so DataLoader workers
can share the folder) and read back afterwards; no separate conversion pass is needed.
The cache lives in ``<cache_dir>/<split>2017_<classes>/``, so the masks of ``classes=voc``
and ``classes=all`` (and of the two splits) never overwrite one another.

Training images are filtered as torchvision's reference pipeline does
(``references/segmentation/coco_utils.py``, ``_coco_remove_images_without_annotations``
after ``FilterAndRemapCocoCategories``): an image is kept when the annotations of the kept
categories (crowd ones included) have a summed ``area`` field above ``min_area`` (1000
pixels there). The val split is never filtered: every image is evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segtrain.data.base import (
    IGNORE_INDEX,
    DatasetError,
    SegmentationDataset,
    read_image,
    read_label,
    require_nonempty,
    require_root,
    require_split,
    voc_colormap,
)

# The 80 categories of instances_*2017.json: id -> name.
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
    19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite",
    39: "baseball bat", 40: "baseball glove", 41: "skateboard", 42: "surfboard",
    43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup", 48: "fork", 49: "knife",
    50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich", 55: "orange",
    56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake",
    62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone",
    78: "microwave", 79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book",
    85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear", 89: "hair drier",
    90: "toothbrush",
}
# VOC class order (segtrain.data.voc.CLASS_NAMES[1:]) -> COCO category id.
VOC_FROM_COCO = (5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
VOC_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
             "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
             "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CLASS_SETS = ("voc", "all")
SPLITS = ("train", "val")

LAYOUT = ("<root>/annotations/instances_{train,val}2017.json and images in "
          "<root>/{train,val}2017/*.jpg")
HOW_TO_GET = ("Download http://images.cocodataset.org/zips/train2017.zip, val2017.zip and "
              "http://images.cocodataset.org/annotations/annotations_trainval2017.zip and "
              "unzip them into dataset.root")


def category_map(classes: str) -> tuple[dict[int, int], tuple[str, ...]]:
    """COCO category id -> train id (1..), and the class names with background first."""
    if classes == "voc":
        return {cid: i + 1 for i, cid in enumerate(VOC_FROM_COCO)}, VOC_NAMES
    if classes == "all":
        ids = sorted(COCO_CATEGORIES)
        return ({cid: i + 1 for i, cid in enumerate(ids)},
                ("background",) + tuple(COCO_CATEGORIES[c] for c in ids))
    raise DatasetError(f"coco: dataset.classes must be one of {CLASS_SETS}, got '{classes}'")


class COCOSegmentation(SegmentationDataset):
    """COCO 2017 train (118,287 images) / val (5,000) as semantic segmentation."""

    name = "coco"

    def __init__(self, root: str | Path, split: str = "train", classes: str = "voc",
                 cache: bool = False, cache_dir: str | Path | None = None,
                 min_area: float | None = None, transforms=None,
                 ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        require_split("coco", split, SPLITS)
        self.cat_to_train, self.class_names = category_map(classes)
        self.palette = voc_colormap(len(self.class_names))
        self.root = require_root(root, "coco", LAYOUT, HOW_TO_GET)
        self.split, self.classes = split, classes
        self.image_dir = self.root / f"{split}2017"
        self.ann_file = self.root / "annotations" / f"instances_{split}2017.json"
        for path, what in ((self.ann_file, "annotation file"), (self.image_dir, "image folder")):
            if not path.exists():
                raise DatasetError(f"coco: {what} not found: {path}. Expected layout: "
                                   f"{LAYOUT}. {HOW_TO_GET}")
        self.coco = _load_coco(self.ann_file)
        self._check_categories()
        ids = sorted(self.coco.getImgIds())
        filtered = split == "train" and min_area is not None
        if filtered:
            ids = [i for i in ids if self.kept_area(i) > float(min_area)]
        require_nonempty(ids, "coco", split,
                         f"{self.ann_file} (images whose '{classes}' objects cover more than "
                         f"dataset.min_area={min_area} pixels)" if filtered else str(self.ann_file))
        self.ids = ids
        self.cache_dir = None
        if cache:
            base = Path(cache_dir) if cache_dir else default_cache_dir(self.root)
            # crowds are written as the ignore index: another index, another folder
            suffix = "" if self.ignore_index == IGNORE_INDEX else f"_ignore{self.ignore_index}"
            self.cache_dir = base / f"{split}2017_{classes}{suffix}"
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def kept_area(self, image_id: int) -> float:
        """Summed ``area`` of the image's annotations of kept categories, crowds included."""
        return sum(float(a.get("area", 0.0)) for a in self.coco.imgToAnns.get(image_id, ())
                   if a["category_id"] in self.cat_to_train)

    def _check_categories(self) -> None:
        """The json's categories must be COCO's (ids and names), so the mapping is right."""
        for cid, cat in self.coco.cats.items():
            expected = COCO_CATEGORIES.get(cid)
            if expected != cat.get("name"):
                raise DatasetError(f"coco: {self.ann_file}: category id {cid} is named "
                                   f"{cat.get('name')!r}, expected {expected!r} (the COCO 2017 "
                                   f"category table)")
        for ann in self.coco.anns.values():
            if ann.get("category_id") not in self.coco.cats:
                raise DatasetError(f"coco: {self.ann_file}: annotation {ann.get('id')} has "
                                   f"category_id {ann.get('category_id')}, which is not in the "
                                   f"file's categories")

    def __len__(self) -> int:
        return len(self.ids)

    def item_names(self) -> list[str]:
        return [str(i) for i in self.ids]

    def _meta(self, index: int) -> dict[str, Any]:
        info = self.coco.imgs[self.ids[index]]
        return {"name": Path(info["file_name"]).stem, "image_id": int(info["id"]),
                "image_path": str(self.image_dir / info["file_name"]),
                "label_path": f"{self.ann_file} (image_id {info['id']})"}

    def make_mask(self, image_id: int) -> np.ndarray:
        """Rasterise the annotations of one image into train ids (see module docstring)."""
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), np.uint8)
        anns = [a for a in self.coco.imgToAnns.get(image_id, [])
                if a["category_id"] in self.cat_to_train]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        instances = sorted((a for a in anns if not a.get("iscrowd", 0)),
                           key=lambda a: -float(a.get("area", 0.0)))
        for ann in crowd:
            mask[self._ann_mask(ann) > 0] = self.ignore_index
        for ann in instances:
            mask[self._ann_mask(ann) > 0] = self.cat_to_train[ann["category_id"]]
        return mask

    def _ann_mask(self, ann: dict) -> np.ndarray:
        try:
            return self.coco.annToMask(ann)
        except Exception as err:  # pycocotools raises bare TypeError/IndexError on bad input
            raise DatasetError(f"coco: {self.ann_file}: cannot rasterise the segmentation of "
                               f"annotation {ann.get('id')} (image_id {ann.get('image_id')}): "
                               f"{type(err).__name__}: {err}") from err

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        meta = self._meta(index)
        if self.cache_dir is None:
            return self.make_mask(meta["image_id"]), meta
        path = self.cache_dir / f"{meta['image_id']:012d}.png"
        if path.is_file():
            return read_label(path), {**meta, "label_path": str(path)}
        mask = self.make_mask(meta["image_id"])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(mask).save(tmp, format="PNG")
        os.replace(tmp, path)
        return mask, meta

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mask, meta = self.load_mask(index)
        return read_image(meta["image_path"]), mask, meta


def default_cache_dir(root: Path) -> Path:
    """~/.cache/segtrain/coco/<hash of root>/ (the data may be read-only); the dataset adds
    ``<split>2017_<classes>/``."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segtrain"
    return base / "coco" / digest


def _load_coco(ann_file: Path):
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            return COCO(str(ann_file))
    except json.JSONDecodeError as err:
        raise DatasetError(f"coco: annotation file {ann_file} is not valid JSON: {err}") from err
    except (KeyError, TypeError, AssertionError) as err:
        raise DatasetError(f"coco: annotation file {ann_file} is not a COCO instances file "
                           f"({type(err).__name__}: {err}); expected keys 'images', "
                           f"'annotations', 'categories'") from err
