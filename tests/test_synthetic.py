"""The embedded dataset: deterministic, the dataset contract, and its designed ambiguity."""

import colorsys

import albumentations as A
import numpy as np
import pytest
import torch

from segtrain.data.synthetic import CLASS_HUES, CLASS_NAMES, SyntheticShapes, render
from segtrain.data.transforms import compose


def test_items_are_a_pure_function_of_seed_split_and_index():
    a, b = SyntheticShapes("train", 10, 48), SyntheticShapes("train", 10, 48)
    for i in (0, 7):
        ia, ma, _ = a.load(i)
        ib, mb, _ = b.load(i)
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    val = SyntheticShapes("val", 10, 48)
    other_seed = SyntheticShapes("train", 10, 48, seed=1)
    assert not np.array_equal(a.load(0)[0], val.load(0)[0])
    assert not np.array_equal(a.load(0)[0], other_seed.load(0)[0])


def test_items_follow_the_dataset_contract():
    pipeline = compose([A.Normalize(mean=(0.5,) * 3, std=(0.25,) * 3)])
    ds = SyntheticShapes("val", 4, 40, transforms=pipeline)
    item = ds[3]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 40, 40)
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (40, 40)
    assert int(item["mask"].max()) < len(CLASS_NAMES) and ds.num_classes == 6
    assert item["meta"]["name"] == "val_000003"
    with pytest.raises(IndexError):
        ds.load(4)


def test_every_class_appears_and_shapes_take_their_class_hue():
    seen = np.zeros(len(CLASS_NAMES), int)
    hue_error = {k: [] for k in range(1, len(CLASS_NAMES))}
    for seed in range(60):
        image, mask = render(seed, 64, 3)
        for k in range(1, len(CLASS_NAMES)):
            region = mask == k
            if region.sum() < 30:
                continue
            seen[k] += 1
            r, g, b = image[region].astype(float).mean(0) / 255
            hue = colorsys.rgb_to_hsv(r, g, b)[0]
            d = abs(hue - CLASS_HUES[k])
            hue_error[k].append(min(d, 1 - d))
    assert (seen[1:] > 5).all(), seen
    # colour narrows a pixel to a pair of classes: disk/ring and square/cross share a hue
    for k, errors in hue_error.items():
        assert np.median(errors) < 0.08, (CLASS_NAMES[k], np.median(errors))
    assert CLASS_HUES[1] == CLASS_HUES[4] and CLASS_HUES[2] == CLASS_HUES[5]
