"""The analysis figures: scripts/confusion_matrix.py (row-normalised heat map of a saved
matrix), scripts/browse_dataset.py (training samples after the real pipeline, ignore pixels
marked); ``eval.dump_worst`` is checked on a real run in tests/test_compare_runs.py."""

from __future__ import annotations

import json
import sys

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, TINY

sys.path.insert(0, str(REPO / "scripts"))
import browse_dataset  # noqa: E402
import confusion_matrix  # noqa: E402


def test_confusion_matrix_figure_from_metrics_json(tmp_path, capsys):
    np.testing.assert_allclose(confusion_matrix.row_normalised(np.array([[3, 1], [0, 0]])),
                               [[0.75, 0.25], [0, 0]])  # a class without pixels: empty row
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"confusion_matrix": [[50, 5, 0], [2, 30, 8], [0, 0, 0]],
         "class_names": ["road", "car", "bike"]}))
    assert confusion_matrix.main([str(tmp_path)]) == 0
    figure = tmp_path / "confusion_matrix.png"
    assert capsys.readouterr().out.strip() == str(figure)
    assert Image.open(figure).size[0] > 200
    with pytest.raises(SystemExit, match="eval_msc.json not found"):
        confusion_matrix.main([str(tmp_path), "--eval", "msc"])


def test_browse_dataset_inverts_the_normalisation_and_marks_ignore_pixels(tmp_path):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    normalised = A.Normalize(mean=mean, std=std)(image=rgb)["image"].transpose(2, 0, 1)
    np.testing.assert_array_equal(browse_dataset.unnormalise(normalised, mean, std), rgb)
    mask = np.zeros((5, 6), np.int64)
    mask[0, :3] = 255
    cell = browse_dataset.cell(normalised, mask, np.array([[0, 0, 0]], np.uint8), 255, mean,
                               std)
    assert (cell[0, :3] == browse_dataset.IGNORE_COLOUR).all()
    assert not (cell[1:] == browse_dataset.IGNORE_COLOUR).all(-1).any()

    # the real pipeline of the embedded dataset: 32x32 crops, 5 samples on rows of 2
    overrides = [o for o in TINY if o.startswith("dataset.")]
    assert browse_dataset.main([*overrides, f"out={tmp_path / 'b'}", "count=5",
                                "columns=2"]) == 0
    grid = np.asarray(Image.open(tmp_path / "b" / "samples.png"))
    assert grid.shape == (3 * 32 + 2 * 2, 2 * 32 + 2, 3)
