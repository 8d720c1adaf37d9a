"""Data-loader throughput of a dataset's training pipeline, in images per second.

    python scripts/benchmark_loader.py dataset=camvid dataset.root=/data/CamVid
    python scripts/benchmark_loader.py dataset=camvid dataset.root=/data/CamVid --workers 0 2

Builds the training set with ``dataset.train_transforms`` exactly as training does (decode,
random scale, pad, crop, flip, normalise), shuffles, and times full epochs through a
``DataLoader`` for each worker count (default: 0 and all CPU cores). The first batch of
each run (worker start-up) is timed separately and left out of the rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from segtrain.app import dataset_config
from segtrain.data.loader import collate
from segtrain.data.transforms import compose as compose_transforms


def measure(dataset, workers: int, batch_size: int, epochs: int) -> tuple[float, float, int]:
    """(images/s after the first batch, seconds to the first batch, images timed)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate, drop_last=False,
                        persistent_workers=workers > 0)
    first, images, start = None, 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            now = time.perf_counter()
            if first is None:
                first, start = now - start, now
                continue
            images += len(batch["image"])
    return images / (time.perf_counter() - start), first, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: dataset=<name> ...")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to time (default: 0 and os.cpu_count())")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = dataset_config(args.overrides)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the loader's work is numpy/OpenCV; keep torch out of the way
    transforms = compose_transforms(instantiate(cfg.train_transforms))
    dataset = instantiate(cfg.train, transforms=transforms)
    workers = args.workers if args.workers is not None else sorted({0, os.cpu_count() or 1})
    print(f"{cfg.name} split={dataset.split}: {len(dataset)} images, batch {args.batch_size}, "
          f"{args.epochs} epoch(s), crop {list(cfg.crop_size)}, {os.cpu_count()} CPU cores")
    for n in workers:
        rate, first, images = measure(dataset, n, args.batch_size, args.epochs)
        print(f"num_workers={n}: {rate:.1f} images/s ({images} images timed; first batch "
              f"{first:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
