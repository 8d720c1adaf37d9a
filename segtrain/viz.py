"""Palettes, coloured masks, overlays, the image | ground truth | prediction strips and the
panels of the worst-scored images (``eval.dump_worst``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


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


def write_worst(worst: Sequence[dict], folder: str | Path, palette: np.ndarray,
                ignore_index: int = 255) -> list[Path]:
    """One image | ground truth | prediction panel per entry of ``Evaluator.worst`` (lowest
    per-image mIoU first), ``<folder>/<rank>_<mIoU>_<image id>.png``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, entry in enumerate(worst, 1):
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in entry["id"])
        path = folder / f"{rank:03d}_miou{100 * entry['miou']:05.1f}_{name}.png"
        Image.fromarray(comparison_strip([entry], palette, ignore_index)).save(path)
        paths.append(path)
    return paths
