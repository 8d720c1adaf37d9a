"""Palettes, coloured masks, overlays and the image | ground truth | prediction strips."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def default_palette(num_classes: int) -> np.ndarray:
    """Pascal VOC's bit-interleaved colour map (the one its palette PNGs use)."""
    palette = np.zeros((max(num_classes, 256), 3), np.uint8)
    for i in range(palette.shape[0]):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette[:num_classes]


def colorize(mask: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """HxW labels -> HxWx3 uint8 colours; the ignore label is drawn white."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette
    lut[ignore_index] = (255, 255, 255)
    return lut[np.clip(mask, 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5,
            ignore_index: int = 255) -> np.ndarray:
    """Blend the coloured mask over the RGB image (ignored pixels stay unblended)."""
    colour = colorize(mask, palette, ignore_index).astype(np.float32)
    out = image[..., :3].astype(np.float32)
    keep = (mask != ignore_index)[..., None]
    out = np.where(keep, (1 - alpha) * out + alpha * colour, out)
    return out.round().astype(np.uint8)


def comparison_strip(samples: Sequence[dict], palette: np.ndarray,
                     ignore_index: int = 255) -> np.ndarray:
    """Rows of image | ground truth | prediction, HxWx3 uint8 (rows padded to one width)."""
    rows = [np.concatenate([s["image"][..., :3], colorize(s["mask"], palette, ignore_index),
                            colorize(s["pred"], palette, ignore_index)], axis=1)
            for s in samples]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)
