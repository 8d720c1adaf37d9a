"""The embedded dataset: shapes on textured backgrounds, generated from a seed.

Nothing is read from disk or downloaded. Backgrounds are textures (stripes at any angle,
checkerboards, blotchy noise) in weakly saturated colours of any hue. Each shape is filled
with a saturated colour near its class's hue, shaded by a faint texture. Disks and rings share
a hue, and so do squares and crosses: a pixel's colour narrows its class down to a pair, and
only the *shape* around it (context a network must look at) decides between disk and ring or
square and cross. Shapes overlap, later ones on top. Item ``i`` of a split is a pure
function of ``(seed, split, i)``, so splits are deterministic and independent of workers.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from typing import Any

import numpy as np

from segtrain.data.base import IGNORE_INDEX, SegmentationDataset

CLASS_NAMES = ("background", "disk", "square", "triangle", "ring", "cross")
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25],
                    [0, 130, 200], [245, 130, 48]], dtype=np.uint8)
# Shapes are saturated; two pairs share a hue (disk/ring red, square/cross green), so
# colour narrows a pixel down to a pair and only the shape around it decides the class.
CLASS_HUES = (0.0, 0.0, 0.33, 0.63, 0.0, 0.33)
HUE_JITTER = 0.04
BACKGROUND_MAX_SATURATION = 0.35
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random texture in two random colours, HxWx3 float in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # stripes
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 10)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0)
    elif kind == 1:  # checkerboard
        cell = int(rng.integers(3, 8))
        t = ((xx // cell + yy // cell) % 2) > 0
    else:  # blotches: upsampled coarse noise
        coarse = rng.random((size // 8 + 2, size // 8 + 2))
        idx = (np.arange(size) / 8).astype(int)
        t = coarse[idx][:, idx] > 0.5
    c0, c1 = _background_colour(rng), _background_colour(rng)
    t = t[..., None].astype(np.float32)
    return c0 * (1 - t) + c1 * t


def _shape_mask(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    """Boolean mask of one shape of class ``kind`` (1..5) at a random place and scale."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.16, 0.28) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = yy - cy, xx - cx
    angle = rng.uniform(0, np.pi / 2)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == 1:  # disk
        return dx**2 + dy**2 <= r**2
    if kind == 2:  # square (rotated)
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == 3:  # triangle (rotated): three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + k * 2 * np.pi / 3
            inside &= (dx * np.cos(a) + dy * np.sin(a)) <= r * 0.55
        return inside
    if kind == 4:  # ring
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    # cross (rotated)
    arm = r * 0.33
    return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    """A weakly saturated colour of any hue and brightness, RGB 0..255."""
    hue, sat = rng.uniform(0, 1), rng.uniform(0, BACKGROUND_MAX_SATURATION)
    return np.array(colorsys.hsv_to_rgb(hue, sat, rng.uniform(0.1, 1.0))) * 255


def class_hue(label: int) -> float:
    """The hue of class ``label``: ``CLASS_HUES`` for the six named classes; beyond them
    (``num_classes`` > 6) hues spread by the golden ratio."""
    return CLASS_HUES[label] if label < len(CLASS_HUES) else (label * 0.618034) % 1.0


def _class_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    """A colour near the class's hue (jittered saturation and brightness), RGB 0..255."""
    hue = (class_hue(label) + rng.normal(0, HUE_JITTER)) % 1.0
    sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255


def render(seed: int, image_size: int, max_shapes: int,
           num_classes: int = len(CLASS_NAMES)) -> tuple[np.ndarray, np.ndarray]:
    """Draw one (image uint8 HxWx3, mask uint8 HxW) from ``seed``. Labels are 1..
    ``num_classes`` - 1 (0 is the background); label ``k`` is drawn as shape kind
    ``(k - 1) % 5 + 1`` in its own hue, so more classes than the six named ones (a paper
    dataset's class count, ``segtrain.reproduce scale=tiny``) are shapes in new colours."""
    rng = np.random.default_rng(seed)
    image = _texture(rng, image_size)
    mask = np.zeros((image_size, image_size), np.uint8)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        label = int(rng.integers(1, num_classes))
        kind = (label - 1) % (len(CLASS_NAMES) - 1) + 1
        region = _shape_mask(rng, kind, image_size)
        # the class hue in a low-contrast texture: locally it looks like background
        # textures of the same colour, which occur too
        shade = _texture(rng, image_size).mean(axis=2, keepdims=True) / 255.0
        fill = _class_colour(rng, label) * (0.75 + 0.25 * shade)
        image[region] = fill[region]
        mask[region] = label
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


class SyntheticShapes(SegmentationDataset):
    """Procedural shapes dataset (the default, ``dataset=synthetic``).

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint seeds).
        num_samples: items in the split.
        image_size: side of the square images.
        max_shapes: shapes per image, 1..max_shapes.
        seed: base seed; item i of a split is a pure function of (seed, split, i).
        transforms: albumentations pipeline ending with Normalize.
        num_classes: 2..255 classes, background included (default: the six named ones).
    """

    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, split: str, num_samples: int, image_size: int, max_shapes: int = 3,
                 seed: int = 0, transforms: Callable[..., dict] | None = None,
                 ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__(transforms, ignore_index, keep_rgb, keep_rows)
        if not 2 <= num_classes <= 255:
            raise ValueError(f"dataset.num_classes must be 2..255, got {num_classes}")
        extra = range(len(CLASS_NAMES), num_classes)
        self.class_names = CLASS_NAMES[:num_classes] + tuple(f"shape{k}" for k in extra)
        self.palette = np.concatenate([PALETTE[:num_classes], np.array(
            [np.array(colorsys.hsv_to_rgb(class_hue(k), 0.9, 0.9)) * 255 for k in extra],
            dtype=np.uint8).reshape(-1, 3)])
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_OFFSET)}, "
                             f"got {split!r}")
        if num_samples <= 0:
            raise ValueError(f"dataset.num_samples must be positive, got {num_samples}")
        self.split, self.num_samples = split, num_samples
        self.image_size, self.max_shapes, self.seed = image_size, max_shapes, seed

    def __len__(self) -> int:
        return self.num_samples

    def item_names(self) -> list[str]:
        return [f"seed{self.seed}_size{self.image_size}_shapes{self.max_shapes}_{self.split}_{i}"
                for i in range(self.num_samples)]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} items")
        item_seed = self.seed * 10_000_019 + _SPLIT_OFFSET[self.split] + index
        image, mask = render(item_seed, self.image_size, self.max_shapes, len(self.class_names))
        return image, mask, {"name": f"{self.split}_{index:06d}"}
