"""Is the difference between two runs real? A paired bootstrap over the validation images.

    python scripts/compare_runs.py outputs/<run A> outputs/<run B>
    python scripts/compare_runs.py outputs/multirun/<poly seeds> outputs/multirun/<step seeds>
    python scripts/compare_runs.py <run A> <run B> <run C> --eval msc_crf  # A vs B, A vs C

Each run must have been evaluated with ``eval.save_per_image=true``: training writes
``per_image.npz`` beside metrics.json (its last evaluation), ``segtrain.evaluate`` writes
``eval_<name>_per_image.npz`` (``--eval <name>``). A side is a run folder, a folder of run
folders (a seed sweep: every sub-folder with the file) or run folders joined by commas. All
runs must have scored the same images (same ids, same classes): checked, else an error.

The images are resampled with replacement (the same resample for both sides: paired); each
resample's mIoU is recomputed from the summed per-image per-class intersections and unions,
exactly as the evaluator scores a set of images (a class with no pixel in prediction or
ground truth is left out of the mean). With several seeds on a side the bootstrap is
hierarchical: each resample first draws that side's seeds with replacement, then scores every
drawn seed on the same image resample and averages them, so the interval holds both the seed
spread and the image sampling (Davison and Hinkley 1997, Sec. 3.8; few seeds give a narrow
seed term: 3 seeds resampled carry (3-1)/3 of their variance). Reported: the difference
A - B of the mean mIoU over seeds, its percentile interval (default 95%), the share of
resamples in which A beats B, and the same per class.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from segtrain.errors import UserError
from segtrain.eval import per_image
from segtrain.eval.metrics import percent


def per_image_file(run: Path, eval_name: str | None) -> Path:
    return run / ("per_image.npz" if eval_name is None else f"eval_{eval_name}_per_image.npz")


def side_runs(arg: str, eval_name: str | None) -> list[Path]:
    """The run folders one command-line side names (a run, a sweep folder, or a,b,c)."""
    runs = []
    for part in arg.split(","):
        path = Path(part).expanduser()
        if not path.is_dir():
            raise UserError(f"run folder not found: {path}")
        if per_image_file(path, eval_name).is_file():
            runs.append(path)
            continue
        inner = sorted(p.parent for p in path.glob(f"*/{per_image_file(Path(), eval_name)}"))
        if not inner:
            raise UserError(f"{path} holds no {per_image_file(Path(), eval_name)} (nor do its "
                            f"sub-folders): evaluate with eval.save_per_image=true"
                            + ("" if eval_name is None else f" and name={eval_name}"))
        runs.extend(inner)
    return runs


def load_side(runs: list[Path], eval_name: str | None) -> dict:
    """``{"ids", "class_names", "counts": int64 (seeds, images, 2, classes)}``."""
    loaded = [per_image.load(per_image_file(r, eval_name)) for r in runs]
    first = loaded[0]
    for run, data in zip(runs[1:], loaded[1:]):
        check_same_images(runs[0], first, run, data)
    counts = np.stack([np.stack([d["intersection"], d["union"]], axis=1) for d in loaded])
    return {"ids": first["ids"], "class_names": first["class_names"], "counts": counts,
            "runs": runs}


def check_same_images(run_a: Path, a: dict, run_b: Path, b: dict) -> None:
    if a["class_names"] != b["class_names"]:
        raise UserError(f"{run_a} and {run_b} have different classes: {a['class_names']} vs "
                        f"{b['class_names']}")
    if a["ids"] != b["ids"]:
        only_a = sorted(set(a["ids"]) - set(b["ids"]))[:3]
        only_b = sorted(set(b["ids"]) - set(a["ids"]))[:3]
        raise UserError(f"{run_a} and {run_b} scored different validation images "
                        f"({len(a['ids'])} vs {len(b['ids'])}; only in the first: {only_a}, "
                        f"only in the second: {only_b}): compare runs on the same split")


def iou_of(sums: np.ndarray) -> np.ndarray:
    """Per-class IoU of summed counts (..., 2, classes); NaN where the union is 0."""
    inter, union = sums[..., 0, :], sums[..., 1, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def mean_iou(iou: np.ndarray) -> np.ndarray:
    """mIoU over the classes where IoU is defined (the evaluator's rule)."""
    defined = ~np.isnan(iou)
    return np.where(defined, iou, 0).sum(-1) / np.maximum(defined.sum(-1), 1)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """The mean over the defined values (a class absent from every seed: NaN, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def image_draws(rng: np.random.Generator, n_images: int, size: int) -> np.ndarray:
    """How often each image is drawn in each of ``size`` resamples (n draws with
    replacement each): int (size, n_images)."""
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=size)


def resampled_scores(counts: np.ndarray, weights: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One side's mIoU (resamples,) and per-class IoU (resamples, classes) on each image
    resample ``weights`` (``image_draws``) of its counts, float (seeds, images, 2, classes):
    each resample also draws the seeds with replacement and averages over them."""
    seeds = rng.integers(0, counts.shape[0], size=(len(weights), counts.shape[0]))
    # (resample, seed, 2, classes): each seed's sums on each image resample
    sums = np.einsum("rn,snkc->rskc", weights, counts)
    picked = np.take_along_axis(iou_of(sums), seeds[:, :, None], axis=1)  # seeds drawn
    return mean_iou(picked).mean(1), _nanmean(picked, axis=1)


def miou_interval(counts: np.ndarray, resamples: int = 10000, level: float = 0.95,
                  seed: int = 0, chunk: int = 1000) -> dict:
    """The percentile interval of one side's mIoU (the mean over its seeds) under the
    resampling of ``bootstrap`` (images; seeds too when there are several): ``miou`` (the
    point), ``low``, ``high``. ``counts``: int (seeds, images, 2, classes)."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([
        resampled_scores(counts.astype(np.float64),
                         image_draws(rng, counts.shape[1], min(chunk, resamples - start)),
                         rng)[0] for start in range(0, resamples, chunk)])
    tail = 100 * (1 - level) / 2
    return {"miou": float(mean_iou(iou_of(counts.sum(1).astype(np.float64))).mean()),
            "low": float(np.percentile(values, tail)),
            "high": float(np.percentile(values, 100 - tail))}


def bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10000, level: float = 0.95,
              seed: int = 0, chunk: int = 1000) -> dict:
    """Paired (hierarchical with seeds) bootstrap of mIoU(A) - mIoU(B).

    Args:
        a, b: per-image counts, int (seeds, images, 2, classes), the same images in order.
    Returns:
        ``diff`` (the point estimate: mean over seeds of A's mIoU minus B's), ``low``,
        ``high`` (the percentile interval), ``a_beats_b`` (share of resamples with A > B),
        ``miou_a``, ``miou_b`` (per seed), per-class ``class_diff``, ``class_low``,
        ``class_high``, ``class_a_beats_b``; NaN where a class is never present.
    """
    rng = np.random.default_rng(seed)
    n_images = a.shape[1]

    def scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        iou = iou_of(counts.sum(1).astype(np.float64))  # (seeds, classes)
        return iou, mean_iou(iou)

    iou_a, miou_a = scores(a)
    iou_b, miou_b = scores(b)
    diffs, class_diffs = [], []
    a_f, b_f = a.astype(np.float64), b.astype(np.float64)
    for start in range(0, resamples, chunk):
        weights = image_draws(rng, n_images, min(chunk, resamples - start))
        sides = [resampled_scores(counts, weights, rng) for counts in (a_f, b_f)]
        diffs.append(sides[0][0] - sides[1][0])
        class_diffs.append(sides[0][1] - sides[1][1])
    diff, class_diff = np.concatenate(diffs), np.concatenate(class_diffs)
    tail = 100 * (1 - level) / 2
    class_point = _nanmean(iou_a, 0) - _nanmean(iou_b, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN class: NaN interval
        class_low, class_high = np.nanpercentile(class_diff, [tail, 100 - tail], axis=0)
    return {"diff": float(miou_a.mean() - miou_b.mean()),
            "low": float(np.percentile(diff, tail)), "high": float(np.percentile(diff, 100 - tail)),
            "a_beats_b": float((diff > 0).mean()), "miou_a": miou_a.tolist(),
            "miou_b": miou_b.tolist(), "class_diff": class_point.tolist(),
            "class_low": class_low.tolist(), "class_high": class_high.tolist(),
            "class_a_beats_b": (class_diff > 0).mean(0).tolist(),
            "resamples": resamples, "level": level, "images": n_images}


def report(name_a: str, name_b: str, side_a: dict, side_b: dict, result: dict) -> str:
    def summary(name: str, side: dict, mious: list[float]) -> str:
        spread = f" +- {percent(np.std(mious, ddof=1))} (seed sd)" if len(mious) > 1 else ""
        return f"{name}: {len(mious)} run(s), mIoU {percent(np.mean(mious))}{spread}"

    level = f"{100 * result['level']:g}%"
    lines = [summary(f"A {name_a}", side_a, result["miou_a"]),
             summary(f"B {name_b}", side_b, result["miou_b"]),
             f"mIoU A - B: {percent(result['diff'], True)}  {level} CI "
             f"[{percent(result['low'], True)}, {percent(result['high'], True)}]  A beats B in "
             f"{100 * result['a_beats_b']:.1f}% of {result['resamples']} paired resamples "
             f"of the {result['images']} images"
             + (" (seeds resampled too)" if max(len(result["miou_a"]),
                                                len(result["miou_b"])) > 1 else ""),
             "", f"{'class':<16} {'A - B':>7}  {level + ' CI':>18}  {'A > B':>6}"]
    for k, name in enumerate(side_a["class_names"]):
        lines.append(f"{name:<16} {percent(result['class_diff'][k], True):>7}  "
                     f"[{percent(result['class_low'][k], True):>7}, "
                     f"{percent(result['class_high'][k], True):>7}]  "
                     f"{100 * result['class_a_beats_b'][k]:5.1f}%")
    return "\n".join(lines)


def compare(arg_a: str, arg_b: str, eval_name: str | None = None, resamples: int = 10000,
            level: float = 0.95, seed: int = 0) -> tuple[dict, str]:
    side_a = load_side(side_runs(arg_a, eval_name), eval_name)
    side_b = load_side(side_runs(arg_b, eval_name), eval_name)
    check_same_images(side_a["runs"][0], side_a, side_b["runs"][0], side_b)
    result = bootstrap(side_a["counts"], side_b["counts"], resamples, level, seed)
    return result, report(arg_a, arg_b, side_a, side_b, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run A, then each run (or seed sweep) to "
                        "compare with it")
    parser.add_argument("--eval", default=None, help="compare segtrain.evaluate's "
                        "eval_<name>_per_image.npz instead of training's per_image.npz")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="of the resampling")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs (A and B)")
    results = []
    try:
        for other in args.runs[1:]:
            result, text = compare(args.runs[0], other, args.eval, args.resamples, args.level,
                                   args.seed)
            print(text + "\n", flush=True)
            results.append({"a": args.runs[0], "b": other, **result})
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
