"""Grid search of the dense CRF's appearance (bilateral) kernel on a subset of val, as the
DeepLab papers tune it (v1 Sec. 4.1 and v2 Sec. 4.1: the smoothness kernel fixed at w2 = 3,
theta_gamma = 3, w1, theta_alpha and theta_beta cross-validated on 100 val images; v2's
search range w1 in [3:6], theta_alpha in [30:10:100], theta_beta in [3:6], the defaults here).

    python scripts/crf_search.py run=outputs/<run>                        # eval=msc_crf, 100 images
    python scripts/crf_search.py run=outputs/<run> --num-images 50 --bi-w 3 4 5 \\
        --bi-xy-std 50 67 80 --bi-rgb-std 3 4 5 --eval crf_v1 --workers 2
    python scripts/crf_search.py run=outputs/<run> 'eval.predictor.scales=[0.25,0.375,0.5]'

The run's model (``segtrain.load_run``) predicts the first ``--num-images`` val images once
through the evaluator's inference path with the eval config's predictor (``--eval``, default
``msc_crf``, honouring its ``output_stride`` and ``precision``); the softmax probabilities
and the images as read from disk (the ones ``segtrain.evaluate`` gives the CRF) are kept in
memory, and each grid point only re-runs the CRF, in ``--workers`` processes (default: every
core). The iterations and the smoothness kernel come from the eval config. Prints mIoU per
grid point (and without CRF), then the best values as YAML to paste into an eval config
(conf/eval/<name>.yaml). A grid point's mIoU is exactly what
``python -m segtrain.evaluate run=<run> eval=<eval> eval.crf.bi_w=...`` gives on the same
images.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from segtrain import app
from segtrain.api import load_run
from segtrain.data.loader import eval_loader
from segtrain.errors import ConfigError, UserError
from segtrain.eval.crf import DenseCRF, default_workers, softmax_probs
from segtrain.eval.crf_grid import crf_matrix, load_cache
from segtrain.eval.evaluator import crf_pool
from segtrain.eval.metrics import ConfusionMatrix, percent, scores_from_matrix

# DeepLab v2 Sec. 4.1's search range (coarse grid)
BI_W = [3.0, 4.0, 5.0, 6.0]
BI_XY_STD = [30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
BI_RGB_STD = [3.0, 4.0, 5.0, 6.0]

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run=<training run folder>")
    parser.add_argument("overrides", nargs="*", metavar="eval.KEY=VALUE",
                        help="overrides of the eval config, as segtrain.evaluate takes them "
                             "(e.g. 'eval.predictor.scales=[0.25,0.375,0.5]')")
    parser.add_argument("--eval", default="msc_crf",
                        help="eval config with a crf (conf/eval/): predictor and fixed values")
    parser.add_argument("--num-images", type=int, default=100,
                        help="first N val images (the papers: 100)")
    parser.add_argument("--bi-w", type=float, nargs="+", default=BI_W)
    parser.add_argument("--bi-xy-std", type=float, nargs="+", default=BI_XY_STD)
    parser.add_argument("--bi-rgb-std", type=float, nargs="+", default=BI_RGB_STD)
    parser.add_argument("--workers", type=int, default=None,
                        help="CRF processes (default: every core)")
    parser.add_argument("--checkpoint", default="best", help="best | last | <path to a .pt>")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    args.run = args.run.removeprefix("run=")
    bad = [o for o in args.overrides if not o.lstrip("+~").startswith("eval.")]
    if bad:
        parser.error(f"only eval.* overrides are taken after the run, got {bad}")
    if args.num_images < 1:
        parser.error("--num-images must be >= 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def predict_subset(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(cache of probabilities, RGB images and masks of the first N val images, the eval
    config)."""
    seg = load_run(args.run, checkpoint=args.checkpoint, device=args.device, eval=args.eval,
                   overrides=args.overrides)
    inference = seg.default
    if inference.crf is None:
        raise ConfigError(f"--eval {args.eval}: conf/eval/{args.eval}.yaml has no crf; use an "
                          f"eval config with one (msc_crf, crf_v1)")
    val_set = app.build_val_set(seg.config)
    cache: dict[str, Any] = {"probs": [], "rgb": [], "mask": []}
    # the evaluator's loader and inference: the logits segtrain.evaluate gives the CRF
    with inference.applied_to(seg.model):
        for i, batch in enumerate(eval_loader(val_set, num_workers=0)):
            if i == args.num_images:
                break
            logits = inference.logits(seg.model, batch["image"].to(seg.device))
            cache["probs"].append(softmax_probs(logits)[0])
            cache["rgb"].append(batch["rgb"][0].numpy())
            cache["mask"].append(batch["mask"][0].numpy())
    cache["num_classes"] = seg.num_classes
    cache["ignore_index"] = seg.ignore_index
    return cache, seg.eval_config


def search(cache: dict[str, Any], base: dict[str, Any], grid: list[dict[str, float]],
           workers: int) -> tuple[float, list[float]]:
    """mIoU without CRF and at every grid point (``base`` holds the fixed CRF values)."""
    n, ignore = cache["num_classes"], cache["ignore_index"]
    plain = ConfusionMatrix(n, ignore)
    for probs, mask in zip(cache["probs"], cache["mask"]):
        plain.update(torch.from_numpy(probs.argmax(0)), torch.from_numpy(mask))
    crfs = [DenseCRF(**{**base, **point}) for point in grid]
    jobs = [(k, crf, i) for k, crf in enumerate(crfs) for i in range(len(cache["probs"]))]
    matrices = [np.zeros((n, n), np.int64) for _ in grid]
    with tempfile.TemporaryDirectory(prefix="crf_search_") as folder:
        path = Path(folder) / "cache.pkl"
        path.write_bytes(pickle.dumps(cache, protocol=pickle.HIGHEST_PROTOCOL))
        with crf_pool(workers, load_cache, (str(path),)) as pool:
            chunk = max(1, len(jobs) // (8 * workers))
            for k, counts in pool.map(crf_matrix, jobs, chunksize=chunk):
                matrices[k] += counts
    miou = lambda m: scores_from_matrix(torch.from_numpy(m))["miou"]  # noqa: E731
    return plain.compute()["miou"], [miou(m) for m in matrices]


def best_yaml(base: dict[str, Any], best: dict[str, float]) -> str:
    crf = {"_target_": "segtrain.eval.crf.DenseCRF", **base, **best}
    crf = {k: (int(v) if isinstance(v, float) and v.is_integer() else v) for k, v in crf.items()}
    return OmegaConf.to_yaml({"crf": crf})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the search; returns the table rows, the best point and its YAML."""
    args = parse_args(argv)
    workers = args.workers or default_workers()
    tic = time.perf_counter()
    cache, eval_cfg = predict_subset(args)
    num = len(cache["probs"])
    print(f"predicted {num} val images with eval={args.eval} in "
          f"{time.perf_counter() - tic:.1f} s", flush=True)
    base = {k: v for k, v in OmegaConf.to_container(eval_cfg.crf, resolve=True).items()
            if k not in ("_target_", "bi_w", "bi_xy_std", "bi_rgb_std")}
    grid = [{"bi_w": w, "bi_xy_std": xy, "bi_rgb_std": rgb} for w, xy, rgb in
            itertools.product(args.bi_w, args.bi_xy_std, args.bi_rgb_std)]
    tic = time.perf_counter()
    plain, mious = search(cache, base, grid, workers)
    print(f"{len(grid)} grid points x {num} images in {time.perf_counter() - tic:.1f} s, "
          f"{workers} CRF processes", flush=True)
    print(f"{'bi_w':>6} {'bi_xy_std':>10} {'bi_rgb_std':>11} {'mIoU':>8}")
    print(f"{'(no CRF)':>29} {percent(plain):>8}")
    for point, miou in zip(grid, mious):
        print(f"{point['bi_w']:6g} {point['bi_xy_std']:10g} {point['bi_rgb_std']:11g} "
              f"{percent(miou):>8}")
    k = int(np.nanargmax(mious))
    text = best_yaml(base, grid[k])
    print(f"\n# best of {len(grid)} points on {num} val images of {args.run}: mIoU "
          f"{percent(mious[k])} (without CRF {percent(plain)}); paste into an eval config")
    print(text, end="", flush=True)
    return {"plain": plain, "grid": grid, "miou": mious, "best": grid[k], "yaml": text}


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
