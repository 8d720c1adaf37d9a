"""Cityscapes, 19 evaluation classes, fine annotations.

Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding", CVPR 2016.
Layout read unchanged (``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
extracted into the same folder)::

    <root>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

``labelIds`` are mapped to the 19 ``trainId``s of the official label table
(cityscapesscripts/helpers/labels.py) with a lookup table at load time; every other id
becomes the ignore index. If ``*_gtFine_labelTrainIds.png`` (written by the official
``createTrainIdLabelImgs.py``) sits beside a label, it is read instead.
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
    remap_labels,
    require_nonempty,
    require_root,
    require_split,
)

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
               "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
               "truck", "bus", "train", "motorcycle", "bicycle")
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)

# labelId -> trainId of the official table; ids 0..33 exist, the 15 without a trainId are
# ignored. 255 appears where the license plate (id -1) was rasterised; also ignored.
LABEL_ID_TO_TRAIN_ID = {
    **{i: IGNORE_INDEX for i in range(34)},
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
    255: IGNORE_INDEX,
}
SPLITS = ("train", "val", "test", "trainval")

LAYOUT = ("<root>/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png with labels in "
          "<root>/gtFine/{train,val,test}/<city>/*_gtFine_labelIds.png "
          "(or *_gtFine_labelTrainIds.png)")
HOW_TO_GET = ("Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
              "https://www.cityscapes-dataset.com/downloads/ (free account) and unzip both into "
              "dataset.root; no conversion is needed")


class Cityscapes(SegmentationDataset):
    """Cityscapes fine: train (2,975), val (500), test (1,525, labels withheld), trainval."""

    class_names = CLASS_NAMES
    palette = PALETTE
    name = "cityscapes"

    def __init__(self, root: str | Path, split: str = "train", transforms=None,
                 ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        require_split("cityscapes", split, SPLITS)
        self.root = require_root(root, "cityscapes", LAYOUT, HOW_TO_GET)
        self.split = split
        self.images: list[Path] = []
        for part in ("train", "val") if split == "trainval" else (split,):
            image_dir = self.root / "leftImg8bit" / part
            if not image_dir.is_dir():
                raise DatasetError(f"cityscapes: image folder not found: {image_dir}. Expected "
                                   f"layout: {LAYOUT}. {HOW_TO_GET}")
            found = sorted(image_dir.glob("*/*_leftImg8bit.png"))
            require_nonempty(found, "cityscapes", part, f"{image_dir}/<city>/*_leftImg8bit.png")
            self.images += found
        # the tables' ignored ids (and labelTrainIds' 255) become dataset.ignore_index
        self._id_lut = make_lut({raw: self.ignore_index if train == IGNORE_INDEX else train
                                 for raw, train in LABEL_ID_TO_TRAIN_ID.items()})
        self._train_id_lut = make_lut({**{i: i for i in range(19)},
                                       IGNORE_INDEX: self.ignore_index})

    def __len__(self) -> int:
        return len(self.images)

    def item_names(self) -> list[str]:
        return [path.name for path in self.images]

    def _label_path(self, image_path: Path) -> tuple[Path, bool]:
        """The label of an image: labelTrainIds if present, else labelIds."""
        stem = image_path.name[: -len("_leftImg8bit.png")]
        folder = self.root / "gtFine" / image_path.parent.parent.name / image_path.parent.name
        train_ids = folder / f"{stem}_gtFine_labelTrainIds.png"
        if train_ids.is_file():
            return train_ids, True
        return folder / f"{stem}_gtFine_labelIds.png", False

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        image_path = self.images[index]
        label_path, is_train_ids = self._label_path(image_path)
        if is_train_ids:
            mask = remap_labels(read_label(label_path), self._train_id_lut, label_path,
                                "trainIds 0..18 or 255")
        else:
            mask = remap_labels(read_label(label_path), self._id_lut, label_path,
                                "labelIds 0..33 of the Cityscapes label table, or 255")
        name = image_path.name[: -len("_leftImg8bit.png")]
        return mask, {"name": name, "image_path": str(image_path), "label_path": str(label_path)}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mask, meta = self.load_mask(index)
        return read_image(meta["image_path"]), mask, meta
