"""``segtrain.predict format=cityscapes|voc|ade20k`` against each benchmark's specification,
on miniature test folders: file names and layout as the server finds them, the label space
(Cityscapes labelIds, VOC indexed palette PNGs, ADE20K 1..150), sizes, and clear errors."""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from segtrain.data.base import voc_colormap
from segtrain.data.cityscapes import Cityscapes
from segtrain.predict import predict
from segtrain.submission import SubmissionError
from tests.conftest import CONF_DIR
from tests.dataset_miniatures import block_labels


class Pattern(torch.nn.Module):
    """Predicts a fixed grid of blocks cycling through all classes, whatever the image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        label = expected_label(*x.shape[-2:], self.num_classes)
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(label).long(), self.num_classes)
        return {"out": one_hot.permute(2, 0, 1)[None].float().expand(len(x), -1, -1, -1)}


def expected_label(height: int, width: int, num_classes: int) -> np.ndarray:
    return block_labels(height, width, list(range(num_classes)), block=2)


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _run(tmp_path: Path, *dataset: str) -> Path:
    """A run folder as training leaves it: .hydra/config.yaml and a checkpoint."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(_compose("config", *dataset), run / ".hydra" / "config.yaml")
    torch.save({"model": {}, "iteration": 0}, run / "checkpoints" / "last.pt")
    return run


def _predict(run: Path, images: Path, out: Path, num_classes: int, monkeypatch, *extra: str):
    monkeypatch.setattr("segtrain.runs.build_model", lambda *a, **k: Pattern(num_classes))
    return predict(_compose("predict", f"run={run}", f"images={images}", f"out={out}",
                            "device=cpu", *extra))


def _image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


# -- Cityscapes ----------------------------------------------------------------------------
CITYSCAPES_TEST = {"berlin/berlin_000000_000019": (24, 36), "bonn/bonn_000010_000019": (30, 18)}


def test_cityscapes_files_are_label_ids_the_official_evaluation_finds(tmp_path, monkeypatch):
    run = _run(tmp_path, "dataset=cityscapes", "dataset.root=/data/cityscapes")
    test_dir = tmp_path / "cs" / "leftImg8bit" / "test"
    for stem, (h, w) in CITYSCAPES_TEST.items():
        _image(test_dir / f"{stem}_leftImg8bit.png", h, w)
    out = tmp_path / "pred"
    written = _predict(run, test_dir, out, 19, monkeypatch, "format=cityscapes",
                       "recursive=true")
    assert len(written) == 2 and not (out / "labels").exists()

    # cityscapesScripts' getPrediction: walk the results folder, exactly one file matching
    # <city>_<seq>_<frame>*.png per ground-truth frame
    walk = [(root, files) for root, _, files in os.walk(out / "submission")]
    official = {7: 0, 8: 1, 26: 13, 33: 18}  # labelId -> trainId: road, sidewalk, car, bicycle
    for stem, (h, w) in CITYSCAPES_TEST.items():
        city, seq, frame = Path(stem).name.split("_")
        found = [Path(root, f) for root, files in walk
                 for f in fnmatch.filter(files, f"{city}_{seq}_{frame}*.png")]
        assert len(found) == 1
        image = Image.open(found[0])
        assert image.mode == "L" and image.size == (w, h)  # single channel, full size
        label_ids = np.asarray(image)
        train_ids = expected_label(h, w, 19)
        for label_id, train_id in official.items():
            assert np.all(label_ids[train_ids == train_id] == label_id)
        # read back as ground truth by segtrain's own Cityscapes reader: the same train ids
        gt = tmp_path / "cs" / "gtFine" / "val" / city
        gt.mkdir(parents=True, exist_ok=True)
        shutil.copy(found[0], gt / f"{city}_{seq}_{frame}_gtFine_labelIds.png")
        _image(tmp_path / "cs" / "leftImg8bit" / "val" / city /
               f"{city}_{seq}_{frame}_leftImg8bit.png", h, w)
    val = Cityscapes(tmp_path / "cs", "val")
    for i in range(len(val)):
        mask, meta = val.load_mask(i)
        assert np.array_equal(mask, expected_label(*mask.shape, 19)), meta["name"]


def test_cityscapes_refuses_names_the_server_cannot_match(tmp_path, monkeypatch):
    run = _run(tmp_path, "dataset=cityscapes", "dataset.root=/data/cityscapes")
    _image(tmp_path / "imgs" / "frame1.png", 8, 8)
    with pytest.raises(SubmissionError, match="frame1.png: not a Cityscapes image name"):
        _predict(run, tmp_path / "imgs", tmp_path / "out", 19, monkeypatch,
                 "format=cityscapes")


def test_a_run_of_another_dataset_is_refused(tmp_path, monkeypatch):
    run = _run(tmp_path, "dataset=voc", "dataset.root=/data/voc")
    _image(tmp_path / "imgs" / "berlin_000000_000019_leftImg8bit.png", 8, 8)
    with pytest.raises(SubmissionError, match="format=cityscapes .*dataset=voc with 21"):
        _predict(run, tmp_path / "imgs", tmp_path / "out", 21, monkeypatch,
                 "format=cityscapes")


# -- PASCAL VOC ----------------------------------------------------------------------------
@pytest.mark.parametrize("competition", ["comp6", "comp5"])
def test_voc_results_layout_with_indexed_palette_pngs(tmp_path, monkeypatch, competition):
    run = _run(tmp_path, "dataset=voc", "dataset.root=/data/voc")
    sizes = {"2008_000001": (20, 26), "2009_000002": (14, 10)}
    for name, (h, w) in sizes.items():
        _image(tmp_path / "JPEGImages" / f"{name}.jpg", h, w)
    _predict(run, tmp_path / "JPEGImages", tmp_path / "out", 21, monkeypatch, "format=voc",
             f"format.competition={competition}")
    folder = tmp_path / "out" / "submission" / "results" / "VOC2012" / "Segmentation"
    assert sorted(p.name for p in folder.iterdir()) == [f"{competition}_test_cls"]
    palette = np.asarray(Image.open(next((folder / f"{competition}_test_cls").iterdir()))
                         .getpalette()[: 21 * 3]).reshape(21, 3)
    assert tuple(palette[1]) == (128, 0, 0) and tuple(palette[15]) == (192, 128, 128)
    assert np.array_equal(palette, voc_colormap(21))
    for name, (h, w) in sizes.items():
        image = Image.open(folder / f"{competition}_test_cls" / f"{name}.png")
        assert image.mode == "P" and image.size == (w, h)
        assert np.array_equal(np.asarray(image), expected_label(h, w, 21))  # index = class


def test_voc_competition_is_comp5_or_comp6(tmp_path, monkeypatch):
    run = _run(tmp_path, "dataset=voc", "dataset.root=/data/voc")
    _image(tmp_path / "imgs" / "2008_000001.jpg", 8, 8)
    with pytest.raises(SubmissionError, match="format.competition='comp4'"):
        _predict(run, tmp_path / "imgs", tmp_path / "out", 21, monkeypatch, "format=voc",
                 "format.competition=comp4")


# -- ADE20K --------------------------------------------------------------------------------
def test_ade20k_files_hold_labels_1_to_150_named_after_the_image(tmp_path, monkeypatch):
    # the ADE20K dataset config is not needed to predict: only its name and class count
    run = _run(tmp_path, "dataset.name=ade20k", "dataset.num_classes=150")
    _image(tmp_path / "images" / "ADE_test_00000001.jpg", 40, 46)
    _predict(run, tmp_path / "images", tmp_path / "out", 150, monkeypatch, "format=ade20k")
    files = sorted((tmp_path / "out" / "submission").iterdir())
    assert [f.name for f in files] == ["ADE_test_00000001.png"]
    image = Image.open(files[0])
    label = np.asarray(image)
    assert image.mode == "L" and image.size == (46, 40)
    assert np.array_equal(label, expected_label(40, 46, 150) + 1)
    assert label.min() == 1 and label.max() == 150  # every class; 0 ("other") never
