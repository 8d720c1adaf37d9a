"""ADE20K SceneParsing, 150 classes, the ``ADEChallengeData2016`` release.

Zhou et al., "Scene Parsing through ADE20K Dataset", CVPR 2017: the benchmark of the MIT
Scene Parsing Challenge 2016 (sceneparsing.csail.mit.edu), on which PSPNet, CPNet and
SPNet report. Layout read unchanged (``ADEChallengeData2016.zip`` extracted; ``root`` may be
that folder or the one holding it)::

    ADEChallengeData2016/images/training/ADE_train_00000001.jpg ..      20,210 images
    ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ..       2,000 images
    ADEChallengeData2016/annotations/training/ADE_train_00000001.png     labels 0..150
    ADEChallengeData2016/annotations/validation/ADE_val_00000001.png
    ADEChallengeData2016/objectInfo150.txt, sceneCategories.txt          (not read)

Label 0 ("other objects", none of the 150) is ignored and 1..150 become 0..149, as the
challenge's evaluation does. Every image must have its annotation and every annotation its
image: a partly extracted archive is an error naming how many files are missing.
"""

from __future__ import annotations

import os
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

# The first name of each entry of the challenge's objectInfo150 (index 1..150), as
# mmsegmentation's ADE20KDataset lists them.
CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book",
    "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")
# The challenge toolkit's colours (color150.mat of CSAIL's semantic-segmentation-pytorch,
# as mmsegmentation ships them), class 0..149 in order; road and skyscraper share grey 140.
PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
], np.uint8)

#: split -> (folder name, number of images in the official release)
FOLDERS = {"train": "training", "val": "validation"}
SPLIT_SIZES = {"train": 20210, "val": 2000}
SPLITS = tuple(FOLDERS)

LAYOUT = ("ADEChallengeData2016/images/{training,validation}/ADE_*.jpg with labels 0..150 in "
          "ADEChallengeData2016/annotations/{training,validation}/ADE_*.png")
HOW_TO_GET = ("Download http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip "
              "and unzip it; dataset.root is the ADEChallengeData2016 folder or the "
              "one holding it")


def find_ade_root(root: str | Path) -> Path:
    """Accept ADEChallengeData2016 itself or the folder holding it."""
    base = require_root(root, "ade20k", LAYOUT, HOW_TO_GET)
    for candidate in (base, base / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() or (candidate / "annotations").is_dir():
            return candidate
    raise DatasetError(f"ade20k: no images/ or annotations/ folder under {base} (looked in "
                       f"{base} and {base / 'ADEChallengeData2016'}). Expected layout: "
                       f"{LAYOUT}. {HOW_TO_GET}")


def _stems(folder: Path, suffix: str) -> set[str]:
    with os.scandir(folder) as entries:
        return {e.name[: -len(suffix)] for e in entries if e.name.endswith(suffix)}


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing: train (20,210) and val (2,000), 150 classes."""

    class_names = CLASS_NAMES
    palette = PALETTE
    name = "ade20k"

    def __init__(self, root: str | Path, split: str = "train", transforms=None,
                 ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        require_split("ade20k", split, SPLITS)
        self.root = find_ade_root(root)
        self.split = split
        folder = FOLDERS[split]
        self.image_dir = self.root / "images" / folder
        self.label_dir = self.root / "annotations" / folder
        for kind, path in (("image", self.image_dir), ("annotation", self.label_dir)):
            if not path.is_dir():
                raise DatasetError(f"ade20k: {kind} folder not found: {path}. Expected layout: "
                                   f"{LAYOUT}. {HOW_TO_GET}")
        images, labels = _stems(self.image_dir, ".jpg"), _stems(self.label_dir, ".png")
        require_nonempty(sorted(images), "ade20k", split, f"{self.image_dir}/*.jpg")
        for missing, have, lack in ((images - labels, self.image_dir, self.label_dir),
                                    (labels - images, self.label_dir, self.image_dir)):
            if missing:
                raise DatasetError(
                    f"ade20k: {len(missing)} of the {len(images | labels)} {split} samples in "
                    f"{have} have no counterpart in {lack} (e.g. {min(missing)}): the download "
                    f"is incomplete. {HOW_TO_GET}")
        self.ids = sorted(images)
        # 0 = other objects (not evaluated); 1..150 -> 0..149
        self._lut = make_lut({0: self.ignore_index, **{i: i - 1 for i in range(1, 151)}})

    def __len__(self) -> int:
        return len(self.ids)

    def item_names(self) -> list[str]:
        return list(self.ids)

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        name = self.ids[index]
        label_path = self.label_dir / f"{name}.png"
        mask = remap_labels(read_label(label_path), self._lut, label_path,
                            "0..150 (0 = other, ignored)")
        return mask, {"name": name, "image_path": str(self.image_dir / f"{name}.jpg"),
                      "label_path": str(label_path)}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        mask, meta = self.load_mask(index)
        return read_image(meta["image_path"]), mask, meta
