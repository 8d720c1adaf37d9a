"""What a training start checks before its first step: the first sample of every split
(image and label sizes, label values), and the data-loader workers the cores allow."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtrain.app import train
from segtrain.data.base import DatasetError
from tests.conftest import TINY, compose_config
from tests.dataset_miniatures import make_camvid


def _camvid_cfg(root: Path, *overrides: str):
    tiny = [o for o in TINY if not o.startswith("dataset.")]  # synthetic-only keys
    return compose_config([*tiny, "dataset=camvid", f"dataset.root={root}",
                           "dataset.crop_size=[32,32]", *overrides])


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_size_mismatch_in_any_split_is_one_line_before_the_first_step(tmp_path, split):
    root = tmp_path / "camvid"
    make_camvid(root, {"train": 3, "val": 2})  # 48x36 images and labels
    label = root / f"{split}annot" / f"0001TP_{split}_0000.png"
    Image.fromarray(np.zeros((18, 24), np.uint8)).save(label)
    with pytest.raises(DatasetError) as err:
        train(_camvid_cfg(root), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"dataset.{split}: its first sample"), \
        message
    assert f"0001TP_{split}_0000.png is 48x36 but its label {label} is 24x18" in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step was taken


def test_loader_workers_are_capped_by_the_cores_with_one_line_and_no_torch_warning(
        tiny_cfg, tmp_path, monkeypatch, caplog):
    # a 1-core machine (torch's DataLoader reads the same affinity mask for its warning)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.INFO, logger="segtrain"):
            train(tiny_cfg("trainer.num_workers=2", "trainer.max_iters=2",
                           "trainer.eval_interval=2"), tmp_path)
    assert not [w for w in caught if "worker processes in total" in str(w.message)]
    capped = [r.getMessage() for r in caplog.records if "trainer.num_workers=2" in
              r.getMessage()]
    assert capped == ["data loader: 1 worker process, not trainer.num_workers=2: this process "
                      "may use 1 core(s)"], capped
