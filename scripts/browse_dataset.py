"""What the network actually sees: a grid of training samples after the real augmentation
pipeline, masks overlaid, ignore pixels marked.

    python scripts/browse_dataset.py out=browse                              # embedded dataset
    python scripts/browse_dataset.py dataset=camvid dataset.root=/data/CamVid out=browse
    python scripts/browse_dataset.py experiment=camvid_deeplabv3plus_mobilenetv2 \
        dataset.root=/data/CamVid out=browse count=16 columns=4

The arguments are training's own overrides (the whole config is composed, as
``python -m segtrain`` does) plus ``out=<folder>`` (required), ``count=<samples>`` (default
12) and ``columns=<per row>`` (default 4). The samples are the first ``count`` of training's
own sample stream (``segtrain.data.loader.train_loader`` with the run's ``seed``: the same
crops, flips and jitter the first steps of that run get). Each cell is the network input
un-normalised with the config's ``dataset.mean``/``dataset.std`` (the values that normalised
it) with the mask blended over it; ignore pixels (``dataset.ignore_index``: padding, void)
are magenta. Writes ``<out>/samples.png`` and prints its path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segtrain import app
from segtrain.data.loader import train_loader
from segtrain.viz import overlay

IGNORE_COLOUR = (255, 0, 255)
OPTIONS = {"out": None, "count": "12", "columns": "4"}


def split_arguments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(this script's options, the training overrides)."""
    options, overrides = dict(OPTIONS), []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in OPTIONS and "=" in arg:
            options[key] = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if not options["out"]:
        raise SystemExit("usage: browse_dataset.py [training overrides ...] out=<folder> "
                         "[count=12] [columns=4]")
    return options, overrides


def unnormalise(image: np.ndarray, mean, std) -> np.ndarray:
    """CxHxW normalised float -> HxWx3 uint8, inverting albumentations' Normalize
    ((x / 255 - mean) / std) with the config's values."""
    rgb = image[:3].transpose(1, 2, 0) * np.asarray(std[:3]) + np.asarray(mean[:3])
    return np.clip(np.rint(255 * rgb), 0, 255).astype(np.uint8)


def cell(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, ignore_index: int,
         mean, std) -> np.ndarray:
    rgb = overlay(unnormalise(image, mean, std), mask, palette, 0.5, ignore_index)
    rgb[mask == ignore_index] = IGNORE_COLOUR
    return rgb


def grid(cells: list[np.ndarray], columns: int, gap: int = 2) -> np.ndarray:
    height = max(c.shape[0] for c in cells)
    width = max(c.shape[1] for c in cells)
    rows = -(-len(cells) // columns)
    out = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255,
                  np.uint8)
    for i, c in enumerate(cells):
        r, k = divmod(i, columns)
        out[r * (height + gap):r * (height + gap) + c.shape[0],
            k * (width + gap):k * (width + gap) + c.shape[1]] = c
    return out


def browse(overrides: list[str], out: Path, count: int = 12, columns: int = 4) -> Path:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(app.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    train_set = app.build_train_set(cfg)
    palette = app.palette_of(train_set, cfg.dataset.num_classes)
    # the run's own stream (its per-rank batch on one process, its seed), in process
    loader = train_loader(train_set, app.train_batch(cfg, 1).per_rank, 0, cfg.seed)
    cells = []
    for batch in loader:
        for image, mask in zip(batch["image"].numpy(), batch["mask"].numpy()):
            cells.append(cell(image, mask, palette, cfg.dataset.ignore_index,
                              cfg.dataset.mean, cfg.dataset.std))
        if len(cells) >= count:
            break
    cells = cells[:count]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "samples.png"
    Image.fromarray(grid(cells, columns)).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    from segtrain.errors import UserError

    options, overrides = split_arguments(sys.argv[1:] if argv is None else argv)
    try:
        path = browse(overrides, Path(options["out"]), int(options["count"]),
                      int(options["columns"]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
