"""The Python API (``segtrain.load_run``) on a tiny trained run: the labels it gives are the
ones ``segtrain.evaluate`` counts for the same checkpoint and eval options, its inputs and
outputs, a lone checkpoint file, the device, the eval option per call, its errors; and the
evaluator's progress output on and off a terminal."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from segtrain import app, load_run
from segtrain.api import InputError, Segmenter, eval_config
from segtrain.core.checkpoint import save_atomic
from segtrain.data.loader import eval_loader
from segtrain.errors import ConfigError
from segtrain.eval.crf import DenseCRF
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.inference import Inference, Predictor
from segtrain.evaluate import RunError, evaluate
from segtrain.models.deeplabv3 import DeepLabV3
from tests.conftest import CONF_DIR, TINY, compose_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread) -> Path:
    """A tiny run trained in this process, with the .hydra/config.yaml Hydra would write."""
    run = tmp_path_factory.mktemp("api") / "run"
    cfg = compose_config(TINY)
    app.train(cfg, run)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    # six steps leave a model that calls every pixel background, and any two inference
    # paths agree on that; untrained weights in best.pt label pixels with every class
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    torch.manual_seed(1)
    state["model"] = app.build_model(cfg).state_dict()
    save_atomic(state, best)
    return run


def _evaluate(run: Path, eval_name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate",
                      overrides=[f"run={run}", f"eval={eval_name}", "num_workers=0",
                                 "device=cpu", *overrides])
    return evaluate(cfg, eval_name)


def _val_images(seg: Segmenter) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The run's val images as read (uint8 HxWx3) and their masks."""
    val = app.build_val_set(seg.config)
    items = [val[i] for i in range(len(val))]
    return [it["rgb"].numpy() for it in items], [it["mask"].numpy() for it in items]


def _matrix(labels: list[np.ndarray], masks: list[np.ndarray], n: int) -> list[list[int]]:
    matrix = np.zeros((n, n), np.int64)
    for label, mask in zip(labels, masks):
        keep = mask != 255
        np.add.at(matrix, (mask[keep], label[keep]), 1)
    return matrix.tolist()


@pytest.mark.parametrize("eval_name", ["whole", "msc_flip", "msc_crf"])
def test_labels_are_those_evaluate_counts(run_dir, eval_name):
    seg = load_run(run_dir, checkpoint="best", device="cpu")
    images, masks = _val_images(seg)
    labels = seg.predict(images, eval=eval_name)
    assert len(labels) == len(images) == 4
    assert len(np.unique(np.concatenate([x.ravel() for x in labels]))) >= 3
    result = _evaluate(run_dir, eval_name, *(["eval.crf_workers=0"] if "crf" in eval_name
                                             else []))
    assert result["checkpoint"] == str(seg.source)
    assert _matrix(labels, masks, seg.num_classes) == result["confusion_matrix"]
    if eval_name != "whole":  # the option changes the labels: the test can tell them apart
        plain = seg.predict(images)
        assert any(not np.array_equal(a, b) for a, b in zip(plain, labels))


def test_inputs_and_outputs(run_dir):
    seg = load_run(run_dir)  # the run's own device: TINY trains on the CPU
    assert seg.device == torch.device("cpu")
    assert next(seg.model.parameters()).device == seg.device
    assert seg.class_names[0] == "background" and seg.palette.shape[1] == 3
    rgb = _val_images(seg)[0][0][:, :27]  # another size than the training crops
    labels = seg.predict(rgb)
    assert labels.shape == (32, 27) and labels.dtype == np.int64
    assert np.array_equal(seg.predict(Image.fromarray(rgb)), labels)
    assert np.array_equal(seg.predict(Image.fromarray(rgb).convert("RGBA")), labels)
    probs = seg.predict(rgb, return_probs=True)
    assert probs.shape == (seg.num_classes, 32, 27) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(0), labels)
    # with the CRF: its marginals, whose argmax is the CRF's label map
    crf_probs = seg.predict(rgb, eval="msc_crf", return_probs=True)
    assert np.array_equal(crf_probs.argmax(0), seg.predict(rgb, eval="msc_crf"))
    assert not np.allclose(crf_probs, probs)
    both = seg.predict((rgb, rgb[:20]))
    assert isinstance(both, list) and [b.shape for b in both] == [(32, 27), (20, 27)]


def test_a_lone_checkpoint_file_and_a_model_left_as_it_was(run_dir, tmp_path):
    alone = tmp_path / "model.pt"  # no run folder around it: the config stored inside
    shutil.copy(run_dir / "checkpoints" / "last.pt", alone)
    rgb = _val_images(load_run(run_dir))[0][1]
    from_file = load_run(alone, device="cpu", eval="msc")
    from_run = load_run(run_dir, checkpoint="last", device="cpu")
    assert from_file.source == alone
    assert np.array_equal(from_file.predict(rgb), from_run.predict(rgb, eval="msc"))
    assert not from_file.model.training


def test_works_inside_a_hydra_application(run_dir):
    seg = load_run(run_dir, device="cpu")
    rgb = _val_images(seg)[0][0]
    expected = seg.predict(rgb, eval="msc")
    seg = load_run(run_dir, device="cpu")  # no cached eval option
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        assert np.array_equal(seg.predict(rgb, eval="msc"), expected)
        assert compose(config_name="config").model is not None  # the user's Hydra intact


def test_output_stride_per_call_and_restored(run_dir):
    torch.manual_seed(0)
    model = DeepLabV3(3, "resnet18", 16, [1, 2], [6, 12, 18], 0.1, None).eval()
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    seg = Segmenter(model, config, torch.device("cpu"), eval_config("whole"),
                    overrides=["eval.output_stride=8"])
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    os16 = seg.predict(rgb, return_probs=True)
    os8 = seg.predict(rgb, eval="whole", return_probs=True)  # the override applies by name
    assert model.output_stride == 16 and not model.training
    assert not np.allclose(os16, os8, atol=1e-4)
    np.testing.assert_array_equal(seg.predict(rgb, return_probs=True), os16)


def test_errors_are_clear(run_dir, tmp_path):
    seg = load_run(run_dir, device="cpu")
    with pytest.raises(InputError, match=r"HxWx3 uint8 .* shape \(8, 8\) and dtype uint8"):
        seg.predict(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="dtype float32"):
        seg.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ConfigError, match="eval='mscc': no such option; conf/eval/ has "
                                          ".*msc_crf"):
        seg.predict(np.zeros((8, 8, 3), np.uint8), eval="mscc")
    with pytest.raises(ConfigError, match="eval.output_stride=8: DeepLabV2 cannot change"):
        load_run(run_dir, device="cpu", overrides=["eval.output_stride=8"])
    with pytest.raises(ConfigError, match="only eval.<key>=<value> overrides"):
        load_run(run_dir, overrides=["model.backbone=resnet50"])
    with pytest.raises(RunError, match="run folder not found"):
        load_run(tmp_path / "nowhere")


class Ramp(torch.nn.Module):
    def forward(self, x):
        return {"out": torch.cat([x[:, :1], -x[:, :1]], 1)}


def _items(n: int):
    return [{"image": torch.full((3, 6, 6), float(i % 2) - 0.5),
             "mask": torch.zeros(6, 6, dtype=torch.int64),
             "rgb": torch.zeros(6, 6, 3, dtype=torch.uint8), "meta": {}} for i in range(n)]


def test_evaluator_draws_a_bar_only_on_a_terminal(monkeypatch, caplog):
    loader = eval_loader(_items(20), num_workers=0)
    ev = Evaluator(loader, 2, 255, ["a", "b"], Inference(Predictor()), show_progress=True)
    stderr = io.StringIO()  # not a terminal: SLURM's output file, nohup, CI
    monkeypatch.setattr("sys.stderr", stderr)
    with caplog.at_level(logging.INFO, logger="segtrain"):
        ev.run(Ramp(), torch.device("cpu"))
    assert stderr.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval: ")]
    assert [line.split(",")[0] for line in lines] == [f"eval: {k}/20 batches"
                                                      for k in (2, 4, 6, 8, 10, 12, 14, 16,
                                                                18, 20)]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segtrain"):
        ev.run(Ramp(), torch.device("cpu"))
    assert terminal.getvalue().startswith("\reval:") and "/20 [" in terminal.getvalue()
    assert not [r for r in caplog.records if r.getMessage().startswith("eval: ")]


def test_inference_crf_needs_the_images_as_read():
    crf = DenseCRF(iterations=2, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=20, bi_rgb_std=10)
    inference = Inference(Predictor(), crf)
    logits = torch.randn(1, 2, 6, 7)
    with pytest.raises(ValueError, match=r"images as read.*\(1, 2, 6, 7\), got None"):
        inference.labels(logits)
    with pytest.raises(ValueError, match=r"got \(1, 7, 6, 3\)"):
        inference.labels(logits, np.zeros((1, 7, 6, 3), np.uint8))
    rgb = np.zeros((1, 6, 7, 3), np.uint8)
    assert np.array_equal(inference.probabilities(logits, rgb).argmax(1),
                          inference.labels(logits, rgb))
