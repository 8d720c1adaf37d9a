"""Each transform of a sample draws from its own random stream (docs/architecture.md, "Randomness").

albumentations' ``Compose.set_random_seed`` hands one seed to every child transform, which
made flip, scale and crop offset one draw: in the CamVid pipeline every flipped sample had
scale < 1.25. Here the real CamVid and VOC training pipelines (composed from their YAML) run
through the loader's own seeding, and flip must be independent of the scale and of the crop
offset by a chi-square test at the 1% level (the draws are seeded, so the test is
deterministic; the correlated pipeline gives p-values around 1e-300).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_config
from hydra.utils import instantiate
from scipy.stats import chi2_contingency

from segtrain.data.loader import SeededAugmentation, train_loader
from segtrain.data.transforms import compose

SAMPLES = 2000
P_MIN = 0.01  # reject independence below this p-value


class ParamsDataset:
    """One fixed image per item; returns the parameters each transform applied to it."""

    def __init__(self, pipeline, height: int, width: int) -> None:
        self.transforms = pipeline
        self.transforms.save_applied_params = True
        self.image = np.zeros((height, width, 3), np.uint8)
        self.mask = np.zeros((height, width), np.uint8)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        out = self.transforms(image=self.image, mask=self.mask)
        return dict(out["applied_transforms"])


def pipeline_of(dataset: str):
    cfg = compose_config([f"dataset={dataset}", "dataset.root=/unused"])
    return compose(instantiate(cfg.dataset.train_transforms)), tuple(cfg.dataset.crop_size)


def draws(dataset: str, height: int, width: int, seed: int = 0):
    """Flip (0/1), scale and relative crop offsets (y, x) of SAMPLES consecutive positions.

    An offset is the crop's corner over its range of positions; NaN where the scaled image
    is no larger than the crop (no choice to make).
    """
    pipeline, (crop_h, crop_w) = pipeline_of(dataset)
    wrapped = SeededAugmentation(ParamsDataset(pipeline, height, width), seed)
    flip, scale, offset_y, offset_x = [], [], [], []
    for position in range(SAMPLES):
        params = wrapped[(0, position)]
        s = params["RandomScaleChoice"]["scale"]
        x0, y0 = params["RandomCrop"]["crop_coords"][:2]
        room_y, room_x = round(height * s) - crop_h, round(width * s) - crop_w
        flip.append(int("HorizontalFlip" in params))
        scale.append(s)
        offset_y.append(y0 / room_y if room_y > 0 else np.nan)
        offset_x.append(x0 / room_x if room_x > 0 else np.nan)
    return tuple(np.array(v) for v in (flip, scale, offset_y, offset_x))


def independence_p(flip: np.ndarray, values: np.ndarray, bins: int = 4) -> float:
    keep = ~np.isnan(values)
    edges = np.quantile(values[keep], np.linspace(0, 1, bins + 1)[1:-1])
    table = np.zeros((2, bins))
    np.add.at(table, (flip[keep], np.searchsorted(edges, values[keep], side="right")), 1)
    return float(chi2_contingency(table)[1])


@pytest.mark.parametrize("dataset,height,width", [("camvid", 360, 480), ("voc", 375, 500)])
def test_flip_is_independent_of_scale_and_crop_offset(dataset, height, width):
    flip, scale, offset_y, offset_x = draws(dataset, height, width)
    assert 0.45 < flip.mean() < 0.55
    assert independence_p(flip, scale) > P_MIN
    assert independence_p(flip, offset_y) > P_MIN
    assert independence_p(flip, offset_x) > P_MIN
    # the scale and the crop offsets are independent of each other as well
    for offset in (offset_y, offset_x):
        keep = ~np.isnan(offset)
        assert abs(np.corrcoef(scale[keep], offset[keep])[0, 1]) < 0.1


def test_albumentations_own_seeding_is_the_correlated_one():
    """The measurement above detects the defect: one seed for every child correlates them."""
    pipeline, _ = pipeline_of("camvid")
    data = ParamsDataset(pipeline, 360, 480)
    flip, scale = [], []
    for position in range(400):
        pipeline.set_random_seed(position)
        params = data[0]
        flip.append(int("HorizontalFlip" in params))
        scale.append(params["RandomScaleChoice"]["scale"])
    flip, scale = np.array(flip), np.array(scale)
    assert independence_p(flip, scale) < 1e-20
    assert (scale[flip == 1] < 1.25).all() and (scale[flip == 0] >= 1.25).all()


def test_a_sample_depends_on_its_stream_position_only():
    """Resume: position p gives the same augmentation whatever came before it."""
    pipeline, _ = pipeline_of("camvid")
    wrapped = SeededAugmentation(ParamsDataset(pipeline, 360, 480), seed=5)
    forward = [wrapped[(0, p)] for p in range(20)]
    backward = [wrapped[(0, p)] for p in reversed(range(20))][::-1]
    assert forward == backward
    other_seed = SeededAugmentation(ParamsDataset(pipeline_of("camvid")[0], 360, 480), seed=6)
    assert [other_seed[(0, p)] for p in range(20)] != forward


def test_resumed_loader_yields_the_same_augmented_batches():
    from segtrain.data.synthetic import SyntheticShapes

    cfg = compose_config(["dataset=camvid", "dataset.root=/unused", "dataset.crop_size=[24,32]"])
    pipeline = compose(instantiate(cfg.dataset.train_transforms))
    data = SyntheticShapes("train", num_samples=12, image_size=32, seed=1, transforms=pipeline)
    full = iter(train_loader(data, batch_size=3, num_workers=0, seed=7))
    batches = [next(full) for _ in range(6)]
    resumed = iter(train_loader(data, batch_size=3, num_workers=0, seed=7, start_iter=4))
    for expected in batches[4:]:
        got = next(resumed)
        assert torch_equal(got["image"], expected["image"])
        assert torch_equal(got["mask"], expected["mask"])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())
