"""The named augmentation knobs (``dataset.augment``, ``train_augmentation``): they rebuild
the papers' pipelines step for step and draw for draw, a knob at its off value drops its
step, the blur is OpenCV's Gaussian (not albumentations' sigma-0 black image), an
experiment overrides one knob, and a list of its own still replaces the pipeline."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain import config_schema
from segtrain.data.transforms import (
    GridElastic,
    RandomScaleChoice,
    compose,
    pad_with_mean,
    seed_independently,
    train_augmentation,
)
from segtrain.errors import ConfigError
from tests.conftest import compose_config

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)
MASK = RNG.integers(0, 6, (40, 56), dtype=np.uint8)


def _pipeline(cfg):
    return compose(instantiate(cfg.dataset.train_transforms))


def _same_draws(a: A.Compose, b: A.Compose, positions: int = 8) -> bool:
    """Both pipelines give the same image and mask for each sample of a seeded stream."""
    for position in range(positions):
        seed_independently(a, 5, position)
        seed_independently(b, 5, position)
        x, y = a(image=IMAGE, mask=MASK), b(image=IMAGE, mask=MASK)
        if x["image"].shape != y["image"].shape or not np.array_equal(x["image"], y["image"]) \
                or not np.array_equal(x["mask"], y["mask"]):
            return False
    return True


def _crop_steps(h: int, w: int, mean=MEAN) -> list:
    return [pad_with_mean(h, w, mean, 255), A.RandomCrop(height=h, width=w)]


def test_voc_knobs_rebuild_deeplabs_list():
    # the list conf/dataset/voc.yaml spelled out before it had knobs
    cfg = compose_config(["dataset=voc", "dataset.root=/x", "dataset.crop_size=[24,32]"])
    spelled = compose([RandomScaleChoice([0.5, 0.75, 1.0, 1.25, 1.5], continuous=False),
                       *_crop_steps(24, 32), A.HorizontalFlip(p=0.5),
                       A.Normalize(mean=MEAN, std=STD)])
    assert _same_draws(_pipeline(cfg), spelled)


def test_pspnet_rotation_knob_rebuilds_its_list():
    # the rotation knob alone: the experiment's Gaussian blur (semseg's RandomGaussianBlur) is
    # switched off here and checked in tests/test_protocol.py
    cfg = compose_config(["experiment=pspnet_voc", "dataset.root=/x",
                          "dataset.crop_size=[24,32]", "dataset.augment.blur=0"])
    assert cfg.dataset.augment.rotate == 10 and cfg.dataset.augment.scales == [0.5, 2.0]
    spelled = compose([RandomScaleChoice([0.5, 2.0], continuous=True),
                       A.Rotate(limit=10, border_mode=0, fill_mask=255, p=1.0),
                       *_crop_steps(24, 32), A.HorizontalFlip(p=0.5),
                       A.Normalize(mean=MEAN, std=STD)])
    assert _same_draws(_pipeline(cfg), spelled)


def test_unet_elastic_knob_rebuilds_its_list():
    cfg = compose_config(["experiment=unet"])
    mean, std = list(cfg.dataset.mean), list(cfg.dataset.std)
    spelled = compose([GridElastic(3, 10.0, p=1.0), A.HorizontalFlip(p=0.5),
                       A.Normalize(mean=mean, std=std)])
    assert _same_draws(_pipeline(cfg), spelled)


@pytest.mark.parametrize("experiment", ["fcn32s_voc", "segnet_basic_camvid"])
def test_whole_image_references_only_normalise(experiment):
    cfg = compose_config([f"experiment={experiment}", "dataset.root=/x",
                          "model.init_from=null"])
    pipeline = _pipeline(cfg)
    assert [type(t).__name__ for t in pipeline.transforms] == ["Normalize"]
    out = pipeline(image=IMAGE, mask=MASK)
    mean = np.array(list(cfg.dataset.mean), np.float32) * 255
    std = np.array(list(cfg.dataset.std), np.float32) * 255
    np.testing.assert_allclose(out["image"], (IMAGE - mean) / std, rtol=1e-5, atol=1e-4)
    assert np.array_equal(out["mask"], MASK)


def test_off_knobs_leave_their_steps_out_and_on_knobs_add_them():
    off = dict(mean=MEAN, std=STD, ignore_index=255, scales=None, continuous_scale=False,
               rotate=0, elastic_std=0, blur=0.0, crop_size=None, hflip=0.0, color_jitter=0.0)
    assert [type(t).__name__ for t in train_augmentation(**off)] == ["Normalize"]
    on = {**off, "scales": [0.5, 2.0], "continuous_scale": True, "rotate": 5,
          "elastic_std": 2.0, "blur": 0.5, "crop_size": [8, 8], "hflip": 0.5,
          "color_jitter": 0.3}
    assert [type(t).__name__ for t in train_augmentation(**on)] == [
        "RandomScaleChoice", "Rotate", "GridElastic", "GaussianBlur", "PadIfNeeded",
        "RandomCrop", "HorizontalFlip", "RGBColorJitter", "Normalize"]


def test_blur_is_opencvs_5x5_gaussian_not_a_black_image():
    # SPNet's semseg: cv2.GaussianBlur(image, (5, 5), 0). albumentations' sigma_limit=0 (the
    # configs' old value) made a NaN kernel and a black image half of the time
    steps = train_augmentation(mean=[0, 0, 0], std=[1 / 255] * 3, ignore_index=255,
                               scales=None, continuous_scale=False, rotate=0, elastic_std=0,
                               blur=1.0, crop_size=None, hflip=0.0, color_jitter=0.0)
    smooth = cv2.resize(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8), (56, 40))
    out = compose(steps)(image=smooth, mask=MASK)["image"]
    expected = cv2.GaussianBlur(smooth, (5, 5), 0).astype(np.float32)
    assert np.abs(out[4:-4, 4:-4] - expected[4:-4, 4:-4]).max() <= 1.0
    assert np.abs(out - smooth).mean() > 0.1  # it did blur


def test_spnet_blur_knob_gives_an_image_not_zeros():
    cfg = compose_config(["experiment=spnet_cityscapes", "dataset.root=/x",
                          "dataset.crop_size=[24,32]"])
    pipeline = _pipeline(cfg)
    assert "GaussianBlur" in [type(t).__name__ for t in pipeline.transforms]
    black = (0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    for position in range(8):
        seed_independently(pipeline, 0, position)
        image = pipeline(image=IMAGE, mask=MASK)["image"]
        inside = image[:20, :20]  # no padding: scaled images are at least 20x28
        assert np.isfinite(image).all()
        assert not np.allclose(inside, black, atol=1e-3)


def test_experiment_overrides_one_knob_and_keeps_the_rest():
    base = compose_config(["dataset=cityscapes", "dataset.root=/x"]).dataset.augment
    spnet = compose_config(["experiment=spnet_cityscapes", "dataset.root=/x"]).dataset.augment
    changed = {k for k in base if base[k] != spnet[k]}
    assert changed == {"scales", "rotate", "blur", "crop_size"}
    assert spnet.crop_size == [768, 768]  # follows the experiment's dataset.crop_size


def test_command_line_turns_a_step_off():
    cfg = compose_config(["dataset=voc", "dataset.root=/x", "dataset.augment.scales=null"])
    names = [type(t).__name__ for t in _pipeline(cfg).transforms]
    assert names == ["PadIfNeeded", "RandomCrop", "HorizontalFlip", "Normalize"]


def test_a_list_of_its_own_replaces_the_pipeline_and_can_embed_it():
    cfg = compose_config(["dataset=synthetic"])
    OmegaConf.update(cfg, "dataset.train_transforms",
                     [{"_target_": "albumentations.VerticalFlip", "p": 1.0},
                      "${dataset.augment}"], merge=False)
    pipeline = _pipeline(cfg)
    assert [type(t).__name__ for t in pipeline.transforms] == [
        "VerticalFlip", "HorizontalFlip", "Normalize"]
    OmegaConf.update(cfg, "dataset.train_transforms",
                     [{"_target_": "albumentations.Normalize", "mean": [0, 0, 0],
                       "std": [1, 1, 1]}], merge=False)
    assert [type(t).__name__ for t in _pipeline(cfg).transforms] == ["Normalize"]


@pytest.mark.parametrize("override,message", [
    ("dataset.augment.hflip=1.5", "dataset.augment.hflip=1.5: expected a number in [0, 1]"),
    ("dataset.augment.scales=[0.5,-2]", "dataset.augment.scales=[0.5, -2]: expected a "
                                        "non-empty list, each a number > 0 or null"),
    ("dataset.augment.crop_size=[24]", "dataset.augment.crop_size=[24]: expected a list of 2"),
    ("dataset.crop_size=[24,32,3]", "dataset.crop_size=[24, 32, 3]: expected a list of 2"),
    ("dataset.augment.rotate=-5", "dataset.augment.rotate=-5: expected a number in [0, 180]"),
])
def test_bad_knob_is_refused_at_start_up(override, message):
    with pytest.raises(ConfigError) as err:
        config_schema.check(compose_config(["dataset=voc", "dataset.root=/x", override]))
    assert str(err.value).startswith(message)
