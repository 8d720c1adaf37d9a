"""PASCAL VOC 2012 segmentation, optionally with the SBD augmented training set.

Everingham et al., "The PASCAL Visual Object Classes Challenge", IJCV 2010; the augmented
set is Hariharan et al., "Semantic contours from inverse detectors" (SBD), ICCV 2011, as
used by every DeepLab paper (Chen et al., TPAMI 2017: "10,582 training images").
Layout read unchanged (``root`` may be ``VOC2012``, ``VOCdevkit`` or the folder above)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png     palette PNG: 0..20, 255 = border
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png  split=train_aug (scripts/prepare_voc_aug.py)
    VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt   10,582 ids

``train_aug`` also accepts the widely shared ``SegmentationClassAug`` folder with a DeepLab
list (``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` per line).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
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

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
PALETTE = voc_colormap(21)
BORDER = 255  # the raw label of the object borders in SegmentationClass
SPLITS = ("train", "val", "trainval", "train_aug")

LAYOUT = ("VOCdevkit/VOC2012/JPEGImages/<id>.jpg, VOCdevkit/VOC2012/SegmentationClass/<id>.png, "
          "VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt, and for "
          "split=train_aug VOCdevkit/VOC2012/SegmentationClassAug/<id>.png with "
          "ImageSets/Segmentation/train_aug.txt")
HOW_TO_GET = ("Download and verify it with: python scripts/download_voc.py --out <dir> "
              "(then dataset.root=<dir>/VOCdevkit/VOC2012); for split=train_aug also run "
              "python scripts/prepare_voc_aug.py --voc <dir>/VOCdevkit/VOC2012 "
              "--sbd <dir>/benchmark_RELEASE")
AUG_LISTS = ("ImageSets/Segmentation/train_aug.txt", "ImageSets/SegmentationAug/train_aug.txt",
             "train_aug.txt")


def find_voc_root(root: str | Path) -> Path:
    """Accept VOC2012 itself, VOCdevkit, or the folder holding VOCdevkit."""
    base = require_root(root, "voc", LAYOUT, HOW_TO_GET)
    for candidate in (base, base / "VOC2012", base / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(f"voc: no JPEGImages folder under {base} (looked in {base}, "
                       f"{base / 'VOC2012'}, {base / 'VOCdevkit' / 'VOC2012'}). Expected "
                       f"layout: {LAYOUT}. {HOW_TO_GET}")


class VOCSegmentation(SegmentationDataset):
    """VOC 2012: train (1,464), val (1,449), trainval (2,913), train_aug (10,582)."""

    class_names = CLASS_NAMES
    palette = PALETTE
    # ImageNet statistics: every VOC model starts from an ImageNet backbone.
    name = "voc"

    def __init__(self, root: str | Path, split: str = "train", transforms=None,
                 ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        require_split("voc", split, SPLITS)
        self.root = find_voc_root(root)
        self.split = split
        if split == "train_aug":
            self.ids, self.label_dir = self._aug_ids(), self.root / "SegmentationClassAug"
        else:
            list_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
            if not list_file.is_file():
                raise DatasetError(f"voc: split list not found: {list_file}. Expected layout: "
                                   f"{LAYOUT}. {HOW_TO_GET}")
            self.ids = unique_names(r[0] for r in read_list_file(list_file, "voc", split))
            self.label_dir = self.root / "SegmentationClass"
        if not self.label_dir.is_dir():
            raise DatasetError(f"voc: label folder not found: {self.label_dir}. Expected "
                               f"layout: {LAYOUT}. {HOW_TO_GET}")
        self._lut = make_lut({**{i: i for i in range(21)}, BORDER: self.ignore_index})

    def _aug_ids(self) -> list[str]:
        for rel in AUG_LISTS:
            list_file = self.root / rel
            if list_file.is_file():
                rows = read_list_file(list_file, "voc", "train_aug")
                # ids, or DeepLab's "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
                return unique_names(PurePosixPath(r[0]).stem for r in rows)
        raise DatasetError(
            f"voc: split 'train_aug' needs the SBD-augmented labels, but no list was found "
            f"(looked for {', '.join(str(self.root / r) for r in AUG_LISTS)}). Build "
            f"SegmentationClassAug and train_aug.txt with: python scripts/prepare_voc_aug.py "
            f"--voc {self.root} --sbd <path>/benchmark_RELEASE (SBD comes with "
            f"python scripts/download_voc.py)")

    def __len__(self) -> int:
        return len(self.ids)

    def item_names(self) -> list[str]:
        return list(self.ids)

    def _paths(self, index: int) -> tuple[str, Path, Path]:
        name = self.ids[index]
        return name, self.root / "JPEGImages" / f"{name}.jpg", self.label_dir / f"{name}.png"

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        name, image_path, label_path = self._paths(index)
        mask = remap_labels(read_label(label_path), self._lut, label_path,
                            "0..20 or 255 (border)")
        return mask, {"name": name, "image_path": str(image_path),
                      "label_path": str(label_path)}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mask, meta = self.load_mask(index)
        return read_image(meta["image_path"]), mask, meta
