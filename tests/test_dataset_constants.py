"""One source for a dataset's constants.

- The dense CRF and the sample figures get exactly the image read from disk, for raw-pixel
  input (experiment=segnet_basic_camvid: mean 0, std 1/255, which an un-normaliser with the
  dataset class's own statistics turned into a white image) and for RGB-D input.
- ``segtrain.predict`` hands the CRF the same image as ``segtrain.evaluate`` and gives the
  same label map for the same image and checkpoint.
- ``dataset.ignore_index`` reaches the labels, the padding, the loss and the metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from segtrain import app
from segtrain.core.distributed import DistInfo
from segtrain.data.base import DatasetError, read_image
from segtrain.data.camvid import PALETTE
from segtrain.errors import ConfigError
from segtrain.eval.crf import DenseCRF
from segtrain.evaluate import evaluate
from segtrain.predict import predict
from tests.conftest import CONF_DIR, compose_config
from tests.dataset_miniatures import make_camvid, make_sunrgbd

SHORT = ["trainer.max_iters=2", "trainer.global_batch_size=2", "trainer.num_workers=0",
         "trainer.eval_interval=2", "trainer.checkpoint_interval=2", "trainer.log_interval=1",
         "trainer.device=cpu", "trainer.resume=null"]


def _compose(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def _record_crf_images(monkeypatch) -> list[np.ndarray]:
    """Every image the dense CRF is called with (CRF in this process: crf_workers=0)."""
    seen: list[np.ndarray] = []
    call = DenseCRF.__call__

    def recording(self, rgb, probs):
        seen.append(np.array(rgb, copy=True))
        return call(self, rgb, probs)

    monkeypatch.setattr(DenseCRF, "__call__", recording)
    return seen


def test_raw_pixel_run_gives_the_crf_and_figures_the_image_as_read(tmp_path, monkeypatch,
                                                                    one_thread):
    root = tmp_path / "CamVid"
    # 32x48: SegNet-Basic's four 2x2 poolings divide it
    make_camvid(root, {"train": 2, "val": 2, "test": 1}, height=32, width=48)
    run = tmp_path / "run"
    cfg = compose_config(["experiment=segnet_basic_camvid", f"dataset.root={root}", *SHORT])
    assert list(cfg.dataset.mean) == [0.0, 0.0, 0.0]  # raw 0..255 pixels into the network
    app.train(cfg, run)
    disk = [read_image(p) for p in sorted((root / "val").glob("*.png"))]

    seen = _record_crf_images(monkeypatch)
    evaluate(_compose("evaluate", f"run={run}", "eval=crf_v1", "eval.crf_workers=0",
                      "eval.num_samples=2", "num_workers=0", "device=cpu"), "crf_v1")
    assert len(seen) == 2
    for crf_image, image in zip(seen, disk):
        assert np.array_equal(crf_image, image), "the CRF got another image than the file's"
    strip = np.asarray(Image.open(run / "eval_crf_v1_samples.png"))
    h, w = disk[0].shape[:2]
    assert strip.shape == (2 * h, 3 * w, 3)
    evaluated = []
    for row, image in enumerate(disk):
        cells = strip[row * h:(row + 1) * h]
        assert np.array_equal(cells[:, :w], image), "the figure shows another image"
        evaluated.append(cells[:, 2 * w:])

    # segtrain.predict on the same files: the same CRF input and the same label maps
    seen.clear()
    out = tmp_path / "pred"
    predict(_compose("predict", f"run={run}", f"images={root / 'val'}", f"out={out}",
                     "eval=crf_v1", "device=cpu"))
    for crf_image, image in zip(seen, disk):
        assert np.array_equal(crf_image, image)
    for path, colours in zip(sorted((root / "val").glob("*.png")), evaluated):
        label = np.asarray(Image.open(out / "labels" / path.name))
        assert np.array_equal(PALETTE[label], colours), f"{path.name}: predict != evaluate"


class Constant(torch.nn.Module):
    """Logits that ignore the input: the evaluation path, not the model, is under test."""

    output_keys = frozenset({"out"})

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x):
        n, _, h, w = x.shape
        return {"out": torch.linspace(0, 1, self.classes).view(1, -1, 1, 1).expand(n, -1, h, w)}


def test_rgbd_evaluation_figures_show_the_rgb_image_as_read(tmp_path):
    make_sunrgbd(tmp_path, train=1, test=2)
    cfg = compose_config(["dataset=sunrgbd", f"dataset.root={tmp_path}",
                          "dataset.use_depth=true", "trainer.num_workers=0",
                          "eval.num_samples=2"])
    val = app.build_val_set(cfg)
    item = val[0]
    assert item["image"].shape[0] == 4  # RGB + depth into the network
    assert np.array_equal(item["rgb"].numpy(), read_image(item["meta"]["image_path"]))
    evaluator = app.build_evaluator(cfg, val, DistInfo())
    evaluator.run(Constant(37), torch.device("cpu"))
    for i, sample in enumerate(evaluator.samples):
        assert np.array_equal(sample["image"], read_image(val.load(i)[2]["image_path"]))


def test_dataset_ignore_index_reaches_labels_padding_loss_and_metrics(tmp_path, one_thread):
    root = tmp_path / "CamVid"
    raw = make_camvid(root, {"train": 2, "val": 2, "test": 1})
    overrides = ["dataset=camvid", f"dataset.root={root}", "dataset.ignore_index=200",
                 "dataset.crop_size=[32,48]", "dataset.num_workers=0"]
    cfg = compose_config(overrides + SHORT + ["model=deeplabv2_resnet18"])
    train, val = app.build_train_set(cfg), app.build_val_set(cfg)
    for i in range(len(val)):
        mask = val[i]["mask"].numpy()
        assert np.array_equal(mask == 200, raw["val"][i] == 11)  # void -> the configured index
    for i in range(6):  # random scales below 1 pad the crop: padding is 200 as well
        values = set(np.unique(train[i % len(train)]["mask"].numpy()).tolist())
        assert values <= set(range(11)) | {200}, values
    # loss and metrics take the same index: a short run counts no void pixel
    metrics = app.train(cfg, tmp_path / "run")
    void = sum(int((m == 11).sum()) for m in raw["val"])
    assert np.array(metrics["confusion_matrix"]).sum() == 2 * 36 * 48 - void


@pytest.mark.parametrize("value, error", [(5, ConfigError), (300, DatasetError)])
def test_ignore_index_that_is_a_class_or_not_uint8_is_refused(tmp_path, value, error):
    root = tmp_path / "CamVid"
    make_camvid(root, {"train": 1, "val": 1, "test": 1})
    cfg = compose_config(["dataset=camvid", f"dataset.root={root}",
                          f"dataset.ignore_index={value}"])
    with pytest.raises(error, match=f"dataset.ignore_index={value}"):
        app.build_val_set(cfg)


def _dataset_classes() -> list[type]:
    """Every SegmentationDataset subclass of every module in segtrain/data."""
    import importlib
    import inspect
    import pkgutil

    import segtrain.data
    from segtrain.data.base import SegmentationDataset

    found = set()
    for info in pkgutil.iter_modules(segtrain.data.__path__):
        module = importlib.import_module(f"segtrain.data.{info.name}")
        found |= {c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, SegmentationDataset) and c is not SegmentationDataset
                  and c.__module__ == module.__name__}
    return sorted(found, key=lambda c: c.__name__)


def test_no_dataset_class_keeps_a_copy_of_the_normalisation_or_the_ignore_index():
    import inspect

    classes = _dataset_classes()
    assert {"ADE20K", "PascalContext", "CamVid", "VOCSegmentation"} <= {c.__name__ for c in classes}
    for cls in classes:
        assert not hasattr(cls, "mean") and not hasattr(cls, "std"), cls.__name__
        # dataset.ignore_index reaches every dataset: its constructor takes it
        assert "ignore_index" in inspect.signature(cls.__init__).parameters, cls.__name__
    assert Path(app.__file__).read_text().count("val_set.mean") == 0
