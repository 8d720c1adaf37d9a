"""Benchmark submission files: the label PNGs each evaluation server reads.

    python -m segtrain.predict run=<run> images=<root>/leftImg8bit/test recursive=true \
        format=cityscapes
    python -m segtrain.predict run=<run> images=<VOC2012 test JPEGImages> format=voc
    python -m segtrain.predict run=<run> images=<ADEChallengeData2016 test images> format=ade20k

Each format turns a prediction in train ids (0..num_classes-1) into the server's label space
and writes it where the server looks, under ``<out>/submission/``; zip that folder's contents.

- Cityscapes (cityscapesScripts ``evaluation/evalPixelLevelSemanticLabeling.py``, which the
  server runs): one single-channel PNG of *labelIds* (the official table's ``id``, not the
  ``trainId``) per image, at the image's size, found recursively by a file name matching
  ``<city>_<seq>_<frame>*.png``; written as ``<city>_<seq>_<frame>_leftImg8bit.png``.
- PASCAL VOC 2012 (devkit, ``VOCevalseg.m``): ``results/VOC2012/Segmentation/
  <comp>_test_cls/<id>.png``, indexed PNGs with the VOC colour map, index = class 0..20;
  ``comp6`` is the competition for training on data beyond VOC (SBD, ImageNet), ``comp5``
  for VOC data only.
- ADE20K SceneParsing (CSAILVision/sceneparsing README): ``<image stem>.png`` with the
  annotation's labels 1..150 (0, "other objects", is not evaluated and never written).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from segtrain.data.base import IGNORE_INDEX, voc_colormap
from segtrain.data.cityscapes import LABEL_ID_TO_TRAIN_ID
from segtrain.errors import UserError


class SubmissionError(UserError):
    """The run or an image name does not fit the chosen benchmark format."""


class SubmissionFormat:
    """A benchmark's label files: ``write(label, image_path, out)`` -> the written path.

    Args:
        dataset: the dataset the run was trained on (``dataset.name`` of its config).
        num_classes: its number of classes; both must be the benchmark's.
    """

    benchmark = ""          # the dataset name (dataset.name) whose label space is written
    num_classes = 0

    def __init__(self, dataset: str, num_classes: int) -> None:
        if dataset != self.benchmark or num_classes != self.num_classes:
            raise SubmissionError(
                f"format={self.benchmark} writes {self.benchmark}'s {self.num_classes}-class "
                f"labels, but the run was trained on dataset={dataset} with {num_classes} "
                f"classes")

    def relative_path(self, image_path: Path) -> Path:
        raise NotImplementedError

    def encode(self, label: np.ndarray) -> Image.Image:
        raise NotImplementedError

    def write(self, label: np.ndarray, image_path: Path, out: Path) -> Path:
        """Write ``label`` (HxW train ids) for the image ``image_path`` under ``out``."""
        if label.max(initial=0) >= self.num_classes:
            raise ValueError(f"label {label.max()} outside 0..{self.num_classes - 1}")
        path = out / self.relative_path(Path(image_path))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.encode(label.astype(np.uint8)).save(path)
        return path


# cityscapesScripts' getCsFileInfo: <city>_<seq>_<frame>_<type>.<ext>, city without "_"
CITYSCAPES_NAME = re.compile(r"^([^_]+)_(\d{6})_(\d{6})(_.*)?$")


class CityscapesSubmission(SubmissionFormat):
    benchmark = "cityscapes"
    num_classes = 19

    def __init__(self, dataset: str, num_classes: int) -> None:
        super().__init__(dataset, num_classes)
        # trainId -> labelId: the inverse of the dataset's own table (one fact, one place)
        self.train_to_label = np.zeros(self.num_classes, np.uint8)
        for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
            if train_id != IGNORE_INDEX:
                self.train_to_label[train_id] = label_id

    def relative_path(self, image_path: Path) -> Path:
        match = CITYSCAPES_NAME.match(image_path.stem)
        if match is None:
            raise SubmissionError(
                f"{image_path}: not a Cityscapes image name <city>_<seq>_<frame>_leftImg8bit.png"
                f" (the server matches predictions to frames by <city>_<seq>_<frame>)")
        city, seq, frame = match.groups()[:3]
        return Path(f"{city}_{seq}_{frame}_leftImg8bit.png")

    def encode(self, label: np.ndarray) -> Image.Image:
        return Image.fromarray(self.train_to_label[label])  # uint8 HxW: mode L


class VOCSubmission(SubmissionFormat):
    benchmark = "voc"
    num_classes = 21

    def __init__(self, dataset: str, num_classes: int, competition: str = "comp6") -> None:
        super().__init__(dataset, num_classes)
        if competition not in ("comp5", "comp6"):
            raise SubmissionError(f"format.competition={competition!r}: VOC segmentation "
                                  f"results are comp5 (VOC data only) or comp6 (other data)")
        self.folder = Path("results", "VOC2012", "Segmentation", f"{competition}_test_cls")
        self.palette = voc_colormap(256).ravel().tolist()

    def relative_path(self, image_path: Path) -> Path:
        return self.folder / f"{image_path.stem}.png"

    def encode(self, label: np.ndarray) -> Image.Image:
        image = Image.fromarray(label)
        image.putpalette(self.palette)  # L -> P: the index is the class
        return image


class ADE20KSubmission(SubmissionFormat):
    benchmark = "ade20k"
    num_classes = 150
    # the annotations' 0 is "other objects" (ignored in training): class c is label c + 1
    first_label = 1

    def relative_path(self, image_path: Path) -> Path:
        return Path(f"{image_path.stem}.png")

    def encode(self, label: np.ndarray) -> Image.Image:
        return Image.fromarray(label + np.uint8(self.first_label))
