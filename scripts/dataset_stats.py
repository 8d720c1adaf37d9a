"""Pixel counts and median-frequency class weights of a dataset's training split.

    python scripts/dataset_stats.py dataset=camvid dataset.root=/data/CamVid
    python scripts/dataset_stats.py dataset=voc dataset.root=/data/VOCdevkit dataset.split=train_aug
    python scripts/dataset_stats.py dataset=ade20k dataset.root=/data/ADEChallengeData2016

Prints one row per class (pixels, images containing it, frequency, weight) and the RGB
mean/std of the split, and writes the json cache that ``loss.class_weights=median_freq``
reads (segtrain.data.stats). Options after the overrides: ``--recompute`` ignores an
existing cache, ``--workers N`` reads labels in N processes, ``--cache-dir DIR`` moves the
cache, ``--no-mean-std`` skips the pass over the images.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from segtrain.app import dataset_config
from segtrain.data.base import DatasetError
from segtrain.data.stats import load_or_compute_stats


def image_mean_std(dataset, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (0..1) over every pixel of the split's images."""
    from torch.utils.data import DataLoader

    class Moments:
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            image = np.asarray(dataset.load(i)[0], np.float64).reshape(-1, 3) / 255.0
            return np.stack([image.sum(0), (image ** 2).sum(0), [len(image)] * 3])

    total = sum(m.numpy() for m in DataLoader(Moments(), batch_size=None, num_workers=workers))
    mean = total[0] / total[2]
    return mean, np.sqrt(np.maximum(total[1] / total[2] - mean ** 2, 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: dataset=<name> ...")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-mean-std", action="store_true")
    args = parser.parse_args(argv)
    cfg = dataset_config(args.overrides)
    try:
        dataset = instantiate(cfg.train)
        counts, weights, path = load_or_compute_stats(dataset, args.cache_dir, args.workers,
                                                      recompute=args.recompute)
    except (DatasetError, InstantiationException) as err:
        # hydra wraps the dataset's own error; show that one
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        print(f"error: {cause}", file=sys.stderr)
        return 1
    print(f"{cfg.name} split={dataset.split} images={counts.num_images} root={dataset.root}")
    width = max(16, *(len(name) for name in dataset.class_names))  # ADE20K: 19 characters
    print(f"{'id':>3} {'class':<{width}} {'pixels':>12} {'images':>7} {'freq':>8} "
          f"{'weight':>8}")
    for c, name in enumerate(dataset.class_names):
        print(f"{c:>3} {name:<{width}} {counts.pixels[c]:>12} {counts.images[c]:>7} "
              f"{counts.frequencies[c]:>8.4f} {weights[c]:>8.4f}")
    print(f"    {'ignore ' + str(dataset.ignore_index):<{width}} {counts.ignored:>12}")
    print("weights:", "[" + ", ".join(f"{w:.4f}" for w in weights) + "]")
    if not args.no_mean_std and dataset.in_channels == 3:
        mean, std = image_mean_std(dataset, args.workers)
        print("mean:", "[" + ", ".join(f"{m:.4f}" for m in mean) + "]",
              "std:", "[" + ", ".join(f"{s:.4f}" for s in std) + "]")
    print(f"cache: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
