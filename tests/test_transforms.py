"""The augmentation steps of segtrain.data.transforms, each against a direct computation."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
from dataset_miniatures import block_labels, label_from_red, pattern_image

from segtrain.data.transforms import (
    Normalize,
    RandomScaleChoice,
    RGBColorJitter,
    compose,
    pad_with_mean,
)


def test_random_scale_discrete_sizes_and_nearest_mask():
    scales = (0.5, 0.75, 1.0, 1.25, 1.5)
    step = RandomScaleChoice(scales, continuous=False)
    pipeline = compose([step])
    mask = block_labels(40, 60, [0, 3, 7, 255])
    image = pattern_image(np.where(mask == 255, 255, mask))
    seen = set()
    for seed in range(30):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=mask)
        h, w = out["mask"].shape
        scale = h / 40
        assert scale in scales and w == round(60 * scale)
        assert out["image"].shape == (h, w, 3)
        assert set(np.unique(out["mask"])) <= {0, 3, 7, 255}  # nearest: no new values
        seen.add(scale)
    assert seen == set(scales)


def test_random_scale_continuous_range_and_alignment():
    step = RandomScaleChoice([0.5, 2.0], continuous=True)
    pipeline = compose([step])
    mask = block_labels(48, 48, list(range(10)), block=12)
    image = pattern_image(mask)
    for seed in range(10):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=mask)
        h = out["mask"].shape[0]
        assert 24 <= h <= 96
        # at the centre of each block the image gives back the mask's label
        recovered = label_from_red(out["image"][..., 0])
        centres = (np.arange(4) * 12 + 6) * h / 48
        for cy in centres.astype(int):
            for cx in centres.astype(int):
                assert recovered[cy, cx] == out["mask"][cy, cx]


def test_random_scale_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"continuous scale needs \[lo, hi\]"):
        RandomScaleChoice([0.5, 1.0, 2.0], continuous=True)
    with pytest.raises(ValueError, match="must be positive"):
        RandomScaleChoice([0.0, 1.0])


def test_pad_with_mean_fills_image_with_mean_and_mask_with_ignore():
    mean = (0.485, 0.456, 0.406)
    image = np.full((10, 12, 3), 7, np.uint8)
    mask = np.full((10, 12), 4, np.uint8)
    out = compose([pad_with_mean(16, 20, mean)])(image=image, mask=mask)
    assert out["image"].shape == (16, 20, 3) and out["mask"].shape == (16, 20)
    # the original sits at the top left; padding goes bottom and right
    assert (out["image"][:10, :12] == 7).all() and (out["mask"][:10, :12] == 4).all()
    expected = np.rint(np.array(mean) * 255)
    assert (out["image"][10:, :] == expected).all() and (out["image"][:, 12:] == expected).all()
    assert (out["mask"][10:, :] == 255).all() and (out["mask"][:, 12:] == 255).all()
    # after normalisation the padding is (almost) zero: it does not shift the input statistics
    norm = compose([pad_with_mean(16, 20, mean), A.Normalize(mean, (0.229, 0.224, 0.225))])
    assert np.abs(norm(image=image, mask=mask)["image"][12:, 15:]).max() < 0.01


def test_pad_with_mean_extra_channel_and_no_op_when_large_enough():
    image = np.full((4, 4, 4), 9.0, np.float32)
    out = compose([pad_with_mean(6, 6, (0.5, 0.5, 0.5), extra_mean=(0.2,))])(
        image=image, mask=np.zeros((4, 4), np.uint8))
    np.testing.assert_allclose(out["image"][5, 5], [127.5, 127.5, 127.5, 51.0])
    big = np.zeros((30, 30, 3), np.uint8)
    assert compose([pad_with_mean(6, 6, (0.5,) * 3)])(image=big)["image"].shape == (30, 30, 3)


def test_normalize_matches_albumentations_and_handles_depth():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ours = Normalize(mean, std, extra_mean=(0.3,), extra_std=(0.1,))(image=rgb)["image"]
    theirs = A.Normalize(mean, std)(image=rgb)["image"]
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # RGB only: extra stats unused
    rgbd = np.concatenate([rgb.astype(np.float32), np.full((8, 9, 1), 76.5, np.float32)], -1)
    out = Normalize(mean, std, extra_mean=(0.3,), extra_std=(0.1,))(image=rgbd)["image"]
    np.testing.assert_allclose(out[..., :3], theirs, atol=1e-5)
    np.testing.assert_allclose(out[..., 3], 0.0, atol=1e-5)  # 76.5 / 255 == 0.3
    with pytest.raises(ValueError, match="4 channels but Normalize has statistics for 3"):
        Normalize(mean, std)(image=rgbd)


def test_rgb_color_jitter():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    off = RGBColorJitter(p=0.0)
    assert (off(image=rgb)["image"] == rgb).all()
    on = compose([RGBColorJitter(0.3, 0.3, 0.3, p=1.0)])
    on.set_random_seed(3)
    out = on(image=rgb)["image"]
    assert out.dtype == np.uint8 and out.shape == rgb.shape and not (out == rgb).all()
    # brightness alone is a plain scaling
    bright = RGBColorJitter(brightness=0.5, contrast=0.0, saturation=0.0, p=1.0)
    scaled = bright.apply(rgb, b=1.2, c=1.0, s=1.0)
    np.testing.assert_array_equal(scaled, np.clip(np.rint(rgb * 1.2), 0, 255))
    # depth (channel 4) is left alone
    rgbd = np.concatenate([rgb.astype(np.float32), np.full((10, 10, 1), 33.0, np.float32)], -1)
    out = on(image=rgbd)["image"]
    assert out.dtype == np.float32 and (out[..., 3] == 33.0).all()
    with pytest.raises(ValueError, match="brightness must be in"):
        RGBColorJitter(brightness=1.5)


def test_compose_is_reproducible_from_a_seed():
    mask = block_labels(50, 50, list(range(5)))
    image = pattern_image(mask)
    pipeline = compose([RandomScaleChoice([0.5, 2.0], continuous=True),
                        pad_with_mean(32, 32, (0.5,) * 3), A.RandomCrop(32, 32),
                        A.HorizontalFlip(p=0.5)])
    pipeline.set_random_seed(11)
    first = [pipeline(image=image, mask=mask) for _ in range(3)]
    pipeline.set_random_seed(11)
    again = [pipeline(image=image, mask=mask) for _ in range(3)]
    for a, b in zip(first, again):
        assert (a["image"] == b["image"]).all() and (a["mask"] == b["mask"]).all()
    assert not all((first[0]["mask"] == f["mask"]).all() for f in first[1:])
