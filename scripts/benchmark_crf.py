"""Time the dense CRF per image, in this process and in worker processes, on real val images.

    python scripts/benchmark_crf.py dataset=camvid dataset.root=/data/CamVid
    python scripts/benchmark_crf.py dataset=camvid dataset.root=/data/CamVid --num-images 20 \\
        --workers 0 2 --eval msc_crf

The CRF values come from ``conf/eval/<--eval>.yaml``. The probabilities are synthetic (the
ground truth made uncertain: 3 x one-hot plus unit Gaussian noise, softmax): the CRF's cost
depends on the image size, the class count and the iterations, not on a model. ``--workers
0`` is the serial path; N >= 1 runs the images in N processes, as ``eval.crf_workers`` does.
Prints seconds per image for each setting.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from segtrain import app
from segtrain.eval.crf import crf_labels
from segtrain.eval.evaluator import crf_pool


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="+", help="dataset=<name> dataset.root=<path> ...")
    parser.add_argument("--num-images", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--eval", default="msc_crf", help="eval config holding the crf values")
    args = parser.parse_args(argv)
    dataset = app.dataset_config(args.overrides)
    with initialize_config_dir(config_dir=str(app.CONF_DIR), version_base="1.3"):
        crf = instantiate(compose(config_name="evaluate", overrides=[
            "run=.", f"eval={args.eval}"]).eval.crf)
    val = instantiate(dataset.val, transforms=None)
    n = dataset.num_classes
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(min(args.num_images, len(val))):
        rgb, mask, _ = val.load(i)
        mask = np.where(mask == dataset.ignore_index, 0, mask)
        logits = 3.0 * np.eye(n, dtype=np.float32)[mask].transpose(2, 0, 1)
        logits += rng.standard_normal(logits.shape).astype(np.float32)
        probs = np.exp(logits - logits.max(0))
        jobs.append((np.ascontiguousarray(rgb), (probs / probs.sum(0)).astype(np.float32)))
    h, w = jobs[0][0].shape[:2]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(jobs)} {dataset.name} val images {h}x{w}, {n} classes, eval={args.eval} "
          f"({crf.iterations} iterations), {cores} cores visible, load average "
          f"{os.getloadavg()[0]:.1f}")
    per_image = {}
    for workers in args.workers:
        tic = time.perf_counter()
        if workers == 0:
            for rgb, probs in jobs:
                crf_labels(crf, rgb, probs)
        else:
            with crf_pool(workers) as pool:
                list(pool.map(crf_labels, [crf] * len(jobs), *zip(*jobs)))
        per_image[workers] = (time.perf_counter() - tic) / len(jobs)
        label = "serial" if workers == 0 else f"{workers} workers"
        print(f"{label:>12}: {per_image[workers]:.3f} s per image", flush=True)
    return per_image


if __name__ == "__main__":
    main()
