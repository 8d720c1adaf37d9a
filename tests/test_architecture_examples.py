"""docs/architecture.md's worked examples run as written: each file of the doc is written to
a scratch folder (the .py where its module path points, the .yaml on Hydra's search path)
and trains through ``segtrain.app.train``."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from segtrain import app
from segtrain.errors import ConfigError
from tests.conftest import CONF_DIR, REPO
from tests.dataset_miniatures import save_jpg, save_png

DOC = REPO / "docs" / "architecture.md"
RUN = ["trainer.max_iters=2", "trainer.global_batch_size=2", "trainer.num_workers=0",
       "trainer.eval_interval=2", "trainer.log_interval=1", "trainer.checkpoint_interval=2",
       "trainer.device=cpu", "trainer.resume=null"]


def doc_files() -> dict[str, str]:
    """``{path: text}`` of every "`path`...:" line followed by a fenced block."""
    pattern = re.compile(r"^`([\w/]+\.(?:py|yaml))`[^\n]*:\n\n```\w+\n(.*?)^```", re.M | re.S)
    return dict(pattern.findall(DOC.read_text()))


@pytest.fixture
def example(tmp_path, monkeypatch):
    """Writes the doc's files into tmp_path; returns a compose function that sees them."""
    files = doc_files()
    for name, text in files.items():
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for package in ("segtrain.models", "segtrain.data"):  # segtrain/<pkg>/x.py importable
        module = importlib.import_module(package)
        monkeypatch.setattr(module, "__path__",
                            [*module.__path__, str(tmp_path / package.replace(".", "/"))])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=[
                f"hydra.searchpath=[file://{tmp_path / 'conf'}]", *RUN, *overrides])

    make.files = files
    return make


def make_folder(root: Path) -> None:
    """``<root>/images/<split>/*.jpg`` + ``labels/<split>/*.png``: an object (1) on
    background (0), void (255) along the top row."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            label = np.zeros((32, 40), np.uint8)
            label[8 + i:20 + i, 10:30] = 1
            label[0] = 255
            image = (rng.integers(0, 40, (32, 40, 3)) + 180 * label[..., None].clip(0, 1))
            save_jpg(root / "images" / split / f"{i:03d}.jpg", image.astype(np.uint8))
            save_png(root / "labels" / split / f"{i:03d}.png", label)


def test_the_doc_has_both_examples_each_one_py_and_one_yaml(example):
    assert set(example.files) == {"segtrain/models/tiny_fcn.py", "conf/model/tiny_fcn.yaml",
                                  "segtrain/data/folder.py", "conf/dataset/folder.yaml"}


def test_the_dataset_example_yields_items_and_trains(example, tmp_path):
    make_folder(tmp_path / "data")
    cfg = example("dataset=folder", f"dataset.root={tmp_path / 'data'}",
                  "dataset.crop_size=[32,32]", "model=segnet_basic", "model.depth=2",
                  "model.channels=8")
    val = app.build_val_set(cfg)
    assert len(app.build_train_set(cfg)) == 4 and len(val) == 2
    item = val[1]
    assert item["image"].shape == (3, 32, 40) and item["image"].dtype == torch.float32
    mask = item["mask"]
    assert mask.dtype == torch.int64
    assert (mask[0] == 255).all() and mask[9, 10] == 1 and mask[9, 9] == 0 and mask[21, 20] == 0
    metrics = app.train(cfg, tmp_path / "run")
    assert metrics["finished"] and 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_the_model_example_trains_and_is_checked_against_the_loss(example, tmp_path):
    pytest.importorskip("segtrain.models.base")  # the model contract
    cfg = example("model=tiny_fcn", "dataset.image_size=32", "dataset.train.num_samples=4",
                  "dataset.val.num_samples=2")
    model = app.build_model(cfg)
    model.train()
    out = model(torch.zeros(2, 3, 36, 44))
    assert set(out) == set(model.output_keys) == {"out"}
    assert out["out"].shape == (2, cfg.dataset.num_classes, 36, 44)
    assert model.output_stride == 4
    assert app.train(cfg, tmp_path / "run")["finished"]
    with pytest.raises(ConfigError, match="prior"):
        app.train(example("model=tiny_fcn", "loss=affinity"), tmp_path / "refused")
