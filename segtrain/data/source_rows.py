"""Each training pixel's row in the full, un-augmented image (``dataset.source_rows``).

HANet indexes its positional encoding by the height of a pixel in the urban-scene frame,
not in the crop (shachoi/HANet datasets/cityscapes.py: position maps through the same joint
transforms as the image). The map rides the albumentations pipeline as a second mask (the
precedent: ``"rgb"`` of the evaluation set), so every geometric step (scale, rotation,
elastic grid, pad, crop, flip) moves it with the image by nearest neighbour. Masks are
padded with the ignore index (0..255), so the map holds ``-1 - row``: a value >= 0 is a
padded pixel. ``decode`` gives the batch's ``"rows"``: row / source height, float32, with
1.0 for padded pixels (the reference pads its map with 128, one past its last row).
"""

from __future__ import annotations

import numpy as np


def encode(height: int, width: int) -> np.ndarray:
    """float32 H x W map of ``-1 - row``, the target the pipeline transforms."""
    rows = -1.0 - np.arange(height, dtype=np.float32)
    return np.ascontiguousarray(np.broadcast_to(rows[:, None], (height, width)))


def decode(encoded: np.ndarray, height: int) -> np.ndarray:
    """float32 map of source row / ``height`` (1.0 where padding filled the map)."""
    rows = np.where(encoded < 0, -1.0 - encoded, float(height))
    return (rows / float(height)).astype(np.float32)
