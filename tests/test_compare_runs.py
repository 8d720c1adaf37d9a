"""``eval.save_per_image`` and scripts/compare_runs.py: per-image counts summed give the
confusion matrix's IoU, the paired bootstrap's 95% interval covers a known difference in about
95% of repetitions on constructed data, seed sweeps widen it, and the script on two tiny runs
prints the difference with its interval (and refuses runs scored on other images);
``eval.dump_worst`` writes the panels of the lowest-scored images of that run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.app import train
from segtrain.eval.metrics import ConfusionMatrix, EvalBatch
from segtrain.eval.per_image import PerImageCounts, image_miou
from tests.conftest import REPO, compose_config

sys.path.insert(0, str(REPO / "scripts"))
import compare_runs  # noqa: E402


def test_per_image_counts_summed_give_the_confusion_matrix_iou():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 9, 7), generator=gen)
    target = torch.randint(0, 4, (3, 9, 7), generator=gen)
    target[0, :2] = 255  # ignored pixels count nowhere
    counts = PerImageCounts(4, 255)
    counts.reset("cpu")
    counts.process(EvalBatch(pred[:2], target[:2], [{"name": "a"}, {"name": "b"}], None))
    counts.process(EvalBatch(pred[2:], target[2:], [{"name": "c"}], None))
    assert counts.evaluate() == {}  # no score joins the evaluation's
    out = counts.result
    assert out["ids"] == ["a", "b", "c"] and out["intersection"].shape == (3, 4)
    cm = ConfusionMatrix(4, 255)
    cm.update(pred, target)
    expected = np.array(cm.compute()["iou"])
    summed = out["intersection"].sum(0) / out["union"].sum(0)
    np.testing.assert_allclose(summed, expected)
    # image a by hand, class 1: pixels both say 1 / pixels either says 1 (not ignored)
    valid = target[0] != 255
    both = ((pred[0] == 1) & (target[0] == 1) & valid).sum().item()
    either = (((pred[0] == 1) | (target[0] == 1)) & valid).sum().item()
    assert (out["intersection"][0, 1], out["union"][0, 1]) == (both, either)


def _population(rng: np.random.Generator, images: int, classes: int, delta: float,
                seed_sd: float = 0.0, seeds: int = 1) -> np.ndarray:
    """Per-image counts (seeds, images, 2, classes) of a model pair: a class is in an image
    with probability 0.6, with a log-normal pixel count; each image has a difficulty shared by
    A and B (the pairing), B finds ``delta`` fewer of the pixels; false positives are sparse.
    A seed shifts every class's hit rate by N(0, seed_sd)."""
    present = rng.random((images, classes)) < 0.6
    gt = np.where(present, rng.lognormal(5, 1, (images, classes)).astype(int) + 1, 0)
    base = np.linspace(0.5, 0.85, classes) + 0.1 * rng.standard_normal((images, 1))
    out = []
    for _ in range(seeds):
        shift = seed_sd * rng.standard_normal(classes)
        hit = np.clip(base + shift + 0.05 * rng.standard_normal((images, classes)), 0.02, 0.98)
        sides = []
        for rate in (hit, np.clip(hit - delta, 0.01, 0.98)):
            tp = rng.binomial(gt, rate)
            fp = rng.poisson(10, (images, classes)) * (rng.random((images, classes)) < 0.3)
            sides.append(np.stack([tp, gt + fp], axis=1))  # intersection, union
        out.append(np.stack(sides))
    return np.stack(out, axis=1)  # (side, seeds, images, 2, classes)


def test_the_95_percent_interval_covers_a_known_difference_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    population = _population(rng, 40000, 5, delta=0.02)[:, 0]  # (side, images, 2, classes)
    miou = compare_runs.mean_iou(compare_runs.iou_of(population.sum(1).astype(float)))
    truth = miou[0] - miou[1]  # the difference on the whole population
    covered, repetitions, n = 0, 200, 80
    for rep in range(repetitions):
        pick = rng.choice(len(population[0]), n, replace=False)
        result = compare_runs.bootstrap(population[0][None, pick], population[1][None, pick],
                                        resamples=1000, seed=rep)
        assert result["low"] <= result["diff"] <= result["high"]
        covered += result["low"] <= truth <= result["high"]
    # binomial(200, 0.95): sd 1.5 points; 3 sd either side
    assert 0.905 <= covered / repetitions <= 0.995, covered


def test_seed_sweeps_widen_the_interval_and_the_point_is_the_mean_over_seeds():
    rng = np.random.default_rng(2)
    counts = _population(rng, 120, 4, delta=0.01, seed_sd=0.04, seeds=4)
    a, b = counts[0], counts[1]
    seeds = compare_runs.bootstrap(a, b, resamples=2000)
    one = compare_runs.bootstrap(a[:1], b[:1], resamples=2000)
    miou = [compare_runs.mean_iou(compare_runs.iou_of(side.sum(1).astype(float)))
            for side in (a, b)]
    assert seeds["diff"] == pytest.approx(miou[0].mean() - miou[1].mean())
    assert seeds["miou_a"] == pytest.approx(miou[0].tolist())
    # the seed spread (4 points of hit rate between seeds) dominates the image sampling
    assert seeds["high"] - seeds["low"] > 1.5 * (one["high"] - one["low"])


RUN = ["dataset.image_size=32", "dataset.train.num_samples=8", "dataset.val.num_samples=3",
       "trainer.max_iters=2", "trainer.global_batch_size=2", "trainer.num_workers=0",
       "trainer.eval_interval=2", "trainer.log_interval=2", "trainer.checkpoint_interval=2",
       "trainer.device=cpu", "trainer.resume=null", "eval.save_per_image=true",
       "eval.dump_worst=2"]


def test_compare_runs_on_two_tiny_runs_and_their_worst_images(tmp_path, capsys, one_thread):
    for name, seed in (("a", 0), ("b", 1)):
        train(compose_config(RUN + [f"seed={seed}"]), tmp_path / name)
    saved = np.load(tmp_path / "a" / "per_image.npz")
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["ids"].tolist() == ["val_000000", "val_000001", "val_000002"]
    # the per-image counts add up to the scores training wrote
    matrix = np.array(metrics["confusion_matrix"])
    np.testing.assert_array_equal(saved["intersection"].sum(0), np.diag(matrix))
    np.testing.assert_array_equal(saved["union"].sum(0),
                                  matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
    # eval.dump_worst=2: the panels of the two images of lowest per-image mIoU, lowest first
    panels = sorted((tmp_path / "a" / "worst" / "iter_0000002").iterdir())
    scores = image_miou(saved["intersection"], saved["union"])
    lowest = [saved["ids"][i] for i in np.argsort(scores, kind="stable")[:2]]
    assert [p.name.split("_", 2)[2][:-4] for p in panels] == lowest
    assert np.asarray(Image.open(panels[0])).shape == (32, 3 * 32, 3)  # image | gt | pred

    out = tmp_path / "compare.json"
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--resamples", "500",
                              "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())[0]
    b_miou = json.loads((tmp_path / "b" / "metrics.json").read_text())["miou"]
    assert result["diff"] == pytest.approx(metrics["miou"] - b_miou)
    assert f"mIoU A - B: {100 * result['diff']:+.2f}  95% CI" in text
    assert "A beats B in" in text and "background" in text

    # a run scored on other images is refused with one line
    train(compose_config(RUN + ["dataset.val.num_samples=2"]), tmp_path / "c")
    assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "scored different validation images (3 vs 2" in capsys.readouterr().err
