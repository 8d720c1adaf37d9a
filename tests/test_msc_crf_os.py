"""DeepLab v2/v3 as the papers train and test them: multi-scale-input training (the loss
against hand-summed per-scale terms), ``loss.label_stride`` shapes, the eval options msc /
msc_flip / msc_crf / crf_v1 and their released CRF values, pydensecrf called as its source
expects, ``eval.output_stride`` (same weights, other geometry), parallel CRF equal to the
serial path, and ``scripts/crf_search.py`` against ``segtrain.evaluate``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from segtrain import app
from segtrain.data.loader import eval_loader
from segtrain.errors import ConfigError
from segtrain.eval.crf import DenseCRF, default_workers
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.inference import Inference, Predictor
from segtrain.evaluate import evaluate
from segtrain.losses.ce import CrossEntropyLoss
from segtrain.models.deeplab import DeepLabV2
from segtrain.models.deeplabv3 import DeepLabV3
from segtrain.models.msc import MultiScaleInputs
from segtrain.predict import predict
from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, REPO, TINY, compose_config, plain_groups

RATES = {"aspp_s": [2, 4, 8, 12], "aspp_l": [6, 12, 18, 24], "largefov": [12]}


def _compose(config_name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def nearest_labels(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent reference: output (i, j) reads input (round(i (H-1)/(h-1)), ...)."""
    H, W = mask.shape[-2:]
    rows = [int(np.floor(i * (H - 1) / (h - 1) + 0.5)) if h > 1 else 0 for i in range(h)]
    cols = [int(np.floor(j * (W - 1) / (w - 1) + 0.5)) if w > 1 else 0 for j in range(w)]
    return mask[..., rows, :][..., cols]


# -- MSC training ----------------------------------------------------------------------------
def test_msc_training_loss_equals_the_hand_summed_per_scale_losses():
    torch.manual_seed(0)
    cfg = compose_config(["model.msc.train_scales=[1.0,0.75,0.5]", "dataset.num_classes=5"])
    model = app.build_model(cfg)  # the app wraps any model when the key is set
    assert isinstance(model, MultiScaleInputs) and model.scales == [1.0, 0.75, 0.5]
    loss_fn = instantiate(cfg.loss)
    image = torch.randn(2, 3, 40, 36)
    mask = torch.randint(0, 5, (2, 40, 36))
    mask[:, :3] = 255  # ignored rows
    model.train()
    terms = loss_fn(model(image), {"mask": mask})

    # by hand, with the inner network and an independent label resize
    net, expected, upsampled = model.model, {}, []
    for s in (1.0, 0.75, 0.5):
        x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear",
                                                 align_corners=False)
        out = net(x)["out"]
        h, w = out.shape[-2:]
        assert (h, w) == (int(40 * s), int(36 * s))
        target = torch.from_numpy(nearest_labels(mask.numpy(), h, w))
        expected[f"ce_s{s:g}"] = F.cross_entropy(out, target, ignore_index=255)
        upsampled.append(F.interpolate(out, size=(40, 36), mode="bilinear",
                                       align_corners=False))
    fused = torch.maximum(torch.maximum(upsampled[0], upsampled[1]), upsampled[2])
    expected["ce"] = F.cross_entropy(fused, mask, ignore_index=255)
    assert set(terms) == {"ce", "ce_s1", "ce_s0.75", "ce_s0.5", "total"}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["total"], sum(expected.values()), rtol=1e-5, atol=1e-6)
    # the scale terms really differ from one another (each sees another resolution)
    assert len({round(float(v.detach()), 5) for v in expected.values()}) == 4


def test_msc_wrapper_evaluates_with_the_same_max_fusion_and_keeps_the_weights():
    torch.manual_seed(1)
    net = DeepLabV2(3, "resnet18", 8, "largefov", RATES).eval()
    wrapped = MultiScaleInputs(net, [1.0, 0.75, 0.5]).eval()
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        # whole-image evaluation of an MSC-trained run is the wrapper's max fusion, which is
        # also what the MSC predictor computes from the bare network
        fused = Predictor()(wrapped, x)
        reference = Predictor(scales=[1.0, 0.75, 0.5], fusion="max")(net, x)
    torch.testing.assert_close(fused, reference)
    assert not torch.allclose(fused, net(x)["out"])
    ids = lambda groups: [[id(p) for p in g["params"]] for g in groups]  # noqa: E731
    assert ids(plain_groups(wrapped)) == ids(plain_groups(net))
    for bad in ([0.75, 0.5], [1.0, 1.0], [1.0, -0.5]):
        with pytest.raises(ConfigError, match="model.msc.train_scales"):
            MultiScaleInputs(net, bad)


def test_msc_and_label_stride_train_through_the_app(tmp_path):
    cfg = compose_config(TINY + ["model.msc.train_scales=[1.0,0.75,0.5]", "loss.label_stride=8",
                                 "trainer.max_iters=2", "trainer.eval_interval=2"])
    metrics = app.train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert any(k.startswith("model.backbone.") for k in state["model"])
    # segtrain.evaluate rebuilds the wrapper from the run's config and scores the same fusion
    result = evaluate(_compose("evaluate", f"run={tmp_path}", "num_workers=0", "device=cpu"),
                      "whole")
    assert result["iteration"] == 2
    assert result["miou"] == pytest.approx(metrics["miou"], abs=1e-12)


# -- label_stride ----------------------------------------------------------------------------
def test_label_stride_uses_the_stride8_logits_and_shrunk_labels():
    torch.manual_seed(2)
    model = DeepLabV2(4, "resnet18", 8, "aspp_s", RATES).train()  # out_lowres: training only
    image = torch.randn(2, 3, 65, 49)  # 65 = 8 * 8 + 1 (the 321 -> 41 geometry), 49 = 6 * 8 + 1
    mask = torch.randint(0, 4, (2, 65, 49))
    with torch.no_grad():
        out = model(image)
    assert out["out"].shape == (2, 4, 65, 49)
    assert out["out_lowres"].shape == (2, 4, 9, 7)
    terms = CrossEntropyLoss(label_stride=8)(out, {"mask": mask})
    # labels subsampled every 8 pixels, as Caffe's Interp shrink_factor 8 samples them
    shrunk = mask[:, ::8, ::8]
    assert shrunk.shape == (2, 9, 7)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(out["out_lowres"], shrunk))
    plain = CrossEntropyLoss()(out, {"mask": mask})
    torch.testing.assert_close(plain["ce"], F.cross_entropy(out["out"], mask))
    assert not torch.allclose(terms["ce"], plain["ce"])
    # an input that is not 8k+1 shrinks to ceil(H / 8) as well
    with torch.no_grad():
        low = model(torch.randn(1, 3, 64, 60))["out_lowres"]
    assert low.shape[-2:] == (8, 8)
    CrossEntropyLoss(label_stride=8)({"out_lowres": low}, {"mask": torch.zeros(1, 64, 60,
                                                                             dtype=torch.long)})


def test_label_stride_errors_name_the_key():
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    with pytest.raises(ConfigError, match="loss.label_stride=8 needs the logits before"):
        CrossEntropyLoss(label_stride=8)({"out": torch.zeros(1, 3, 32, 32)}, {"mask": mask})
    # an output-stride-16 model with label_stride 8
    model = DeepLabV3(3, "resnet18", 16, None, [6, 12, 18], 0.1, None).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))  # 2 images: training-mode BatchNorm
    assert out["out_lowres"].shape[-2:] == (2, 2)
    with pytest.raises(ConfigError, match=r"loss.label_stride=8: .* shrink to \(4, 4\)"):
        CrossEntropyLoss(label_stride=8)(out, {"mask": mask.expand(2, -1, -1)})
    with pytest.raises(ConfigError, match="loss.label_stride must be"):
        CrossEntropyLoss(label_stride=0)


def test_deeplabv2_experiment_uses_label_stride_8():
    cfg = compose_config(["experiment=deeplabv2_voc", "dataset.root=/nowhere"])
    assert cfg.loss.label_stride == 8
    assert cfg.model.msc.train_scales is None
    assert compose_config([]).loss.label_stride is None


# -- eval options and CRF values -------------------------------------------------------------
def test_eval_msc_is_deeplab_v2s_test_and_flip_is_separate():
    msc = compose_config(["eval=msc"]).eval
    assert list(msc.predictor.scales) == [0.5, 0.75, 1.0]
    assert msc.predictor.fusion == "max" and msc.predictor.flip is False and msc.crf is None
    flip = compose_config(["eval=msc_flip"]).eval
    assert flip.predictor.flip is True and list(flip.predictor.scales) == [0.5, 0.75, 1.0]
    crf = compose_config(["eval=msc_crf"]).eval
    assert crf.predictor.flip is False and list(crf.predictor.scales) == [0.5, 0.75, 1.0]


def _crf_values(eval_name: str) -> dict:
    node = compose_config([f"eval={eval_name}"]).eval.crf
    return {k: node[k] for k in ("iterations", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std",
                                 "bi_rgb_std")}


def test_crf_defaults_are_the_released_values():
    # DeepLab v2 ResNet-101 test prototxt: max_iter 10, pos 3 / 1, bilateral 4 / 67 / 3
    assert _crf_values("msc_crf") == dict(iterations=10, pos_w=3, pos_xy_std=1, bi_w=4,
                                          bi_xy_std=67, bi_rgb_std=3)
    # DeepLab v1 LargeFOV: bilateral 4 / 121 / 5, Gaussian 3 / 3
    assert _crf_values("crf_v1") == dict(iterations=10, pos_w=3, pos_xy_std=3, bi_w=4,
                                         bi_xy_std=121, bi_rgb_std=5)
    v1 = compose_config(["eval=crf_v1"]).eval
    assert list(v1.predictor.scales) == [1.0] and v1.predictor.flip is False


class RecordingCRF:
    """Stands in for pydensecrf.densecrf.DenseCRF2D and records how it is called."""

    calls: list = []

    def __init__(self, w, h, k):
        self.w, self.h, self.k = w, h, k
        RecordingCRF.calls = [("init", w, h, k)]

    def setUnaryEnergy(self, u):
        RecordingCRF.calls.append(("unary", u))

    def addPairwiseGaussian(self, **kw):
        RecordingCRF.calls.append(("gaussian", kw))

    def addPairwiseBilateral(self, **kw):
        RecordingCRF.calls.append(("bilateral", kw))

    def inference(self, n):
        RecordingCRF.calls.append(("inference", n))
        return np.full((self.k, self.w * self.h), 1.0 / self.k, np.float32)


def test_dense_crf_calls_pydensecrf_with_stds_weights_and_the_original_image(monkeypatch):
    import pydensecrf.densecrf as dcrf

    monkeypatch.setattr(dcrf, "DenseCRF2D", RecordingCRF)
    node = compose_config(["eval=msc_crf"]).eval.crf
    crf = instantiate(node)
    # an image as PIL decodes it: read-only
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    read = rgb.copy()
    read.setflags(write=False)
    probs = np.full((3, 5, 7), 1 / 3, np.float32)
    crf(read, probs)
    calls = dict((c[0], c[1:]) for c in RecordingCRF.calls)
    assert calls["init"] == (7, 5, 3)  # width, height, labels
    unary = calls["unary"][0]
    assert unary.dtype == np.float32 and unary.flags.c_contiguous and unary.shape == (3, 35)
    np.testing.assert_allclose(unary, -np.log(1 / 3), rtol=1e-6)
    assert calls["gaussian"][0] == {"sxy": 1, "compat": 3}
    bilateral = calls["bilateral"][0]
    image = bilateral.pop("rgbim")
    assert bilateral == {"sxy": 67, "srgb": 3, "compat": 4}
    assert image.dtype == np.uint8 and image.flags.c_contiguous and image.flags.writeable
    assert np.array_equal(image, rgb)  # the 0..255 colours the colour std refers to
    assert calls["inference"] == (10,)


def test_dense_crf_rejects_non_positive_values():
    with pytest.raises(ConfigError, match="eval.crf.bi_xy_std must be positive"):
        DenseCRF(10, 3, 1, 4, 0, 3)


# -- eval.output_stride ----------------------------------------------------------------------
class SpyPredictor(Predictor):
    """Records the model's output stride, its layer4 dilation and the logits it predicts."""

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def __call__(self, model, image):
        logits = super().__call__(model, image)
        conv = model.backbone.layer4[0].conv1
        self.seen.append((model.output_stride, conv.dilation, conv.stride, logits.clone()))
        return logits


def _v3() -> DeepLabV3:
    torch.manual_seed(3)
    return DeepLabV3(3, "resnet18", 16, [1, 2], [6, 12, 18], 0.1, None)


def _eval_set(n: int = 2, size: int = 40):
    rng = np.random.default_rng(4)
    return [{"image": torch.from_numpy(rng.standard_normal((3, size, size)).astype(np.float32)),
             "mask": torch.from_numpy(rng.integers(0, 3, (size, size))),
             "rgb": torch.from_numpy(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
             "meta": {}} for _ in range(n)]


def test_eval_output_stride_8_changes_geometry_not_weights_and_restores_16():
    model = _v3()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = eval_loader(_eval_set(), num_workers=0)
    spies = {}
    for stride in (None, 8):
        spies[stride] = SpyPredictor()
        Evaluator(loader, 3, 255, ["a", "b", "c"],
                  Inference(spies[stride], output_stride=stride)).run(model, torch.device("cpu"))
    (os16, dil16, st16, out16), (os8, dil8, st8, out8) = spies[None].seen[0], spies[8].seen[0]
    assert (os16, os8) == (16, 8)
    assert dil8 != dil16 and st16 == (1, 1) and st8 == (1, 1)  # layer4 dilated further at 8
    assert not torch.allclose(out16, out8, atol=1e-4)  # same weights, another geometry
    # restored: the training stride, train mode and exactly the same parameters and buffers
    assert model.output_stride == 16 and model.training
    assert model.backbone.layer4[0].conv1.dilation == dil16
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.eval()
    with torch.no_grad():
        again = model(torch.stack([_eval_set()[0]["image"]]))["out"]
    torch.testing.assert_close(again, out16)


def test_eval_output_stride_through_an_msc_wrapper():
    wrapped = MultiScaleInputs(_v3(), [1.0, 0.5])
    loader = eval_loader(_eval_set(1), num_workers=0)
    Evaluator(loader, 3, 255, ["a", "b", "c"], Inference(Predictor(), output_stride=8)).run(
        wrapped, torch.device("cpu"))
    assert wrapped.output_stride == 16


def test_eval_output_stride_on_a_model_without_it_is_a_config_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg("eval.output_stride=8")  # the default model, DeepLab v2 (ResNet-18)
    with pytest.raises(ConfigError, match="eval.output_stride=8: DeepLabV2 cannot change"):
        app.train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # refused before training


# -- parallel CRF ----------------------------------------------------------------------------
class Noisy(nn.Module):
    """Logits = 2 * one-hot of a colour rule plus noise: the CRF has something to clean."""

    def forward(self, x):
        noise = torch.sin(37.0 * x[:, :1] + 11.0 * x[:, 1:2])
        logits = torch.stack([x[:, 0] - x[:, 2], x[:, 2] - x[:, 0], 0.3 * noise[:, 0]], 1)
        return {"out": 2 * logits}


def _crf_set():
    rng = np.random.default_rng(5)
    items = []
    for h, w in [(24, 30), (20, 20), (31, 17), (16, 28), (22, 22)]:
        rgb = np.zeros((h, w, 3), np.float32)
        rgb[:, : w // 2] = (0.8, 0.1, 0.1)
        rgb[:, w // 2:] = (0.1, 0.1, 0.8)
        rgb += rng.normal(0, 0.25, rgb.shape).astype(np.float32)
        mask = np.zeros((h, w), np.int64)
        mask[:, w // 2:] = 1
        rgb = np.clip(rgb, 0, 1)
        image = torch.from_numpy(((rgb - 0.5) / 0.25).transpose(2, 0, 1).copy())
        read = torch.from_numpy(np.rint(255 * rgb).astype(np.uint8))  # the image as read
        items.append({"image": image, "mask": torch.from_numpy(mask), "rgb": read,
                      "meta": {}})
    return items


def test_parallel_crf_equals_the_serial_path_bit_for_bit():
    crf = DenseCRF(iterations=5, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=20, bi_rgb_std=10)
    loader = eval_loader(_crf_set(), num_workers=0)
    runs = {}
    for workers in (0, 2, None):
        ev = Evaluator(loader, 3, 255, ["a", "b", "c"], Inference(Predictor(), crf),
                       num_samples=5, crf_workers=workers)
        runs[workers] = (ev.run(Noisy(), torch.device("cpu")), ev.samples)
    plain = Evaluator(loader, 3, 255, ["a", "b", "c"], Inference(Predictor())).run(
        Noisy(), torch.device("cpu"))
    serial_scores, serial_samples = runs[0]
    assert serial_scores["confusion_matrix"] != plain["confusion_matrix"]  # the CRF acts
    for workers in (2, None):
        scores, samples = runs[workers]
        assert scores["confusion_matrix"] == serial_scores["confusion_matrix"]
        assert scores["miou"] == serial_scores["miou"]
        assert len(samples) == 5
        for a, b in zip(samples, serial_samples):  # the loader's order
            assert a["pred"].shape == b["pred"].shape and np.array_equal(a["pred"], b["pred"])
            assert np.array_equal(a["mask"], b["mask"])


def test_crf_workers_default():
    # a negative eval.crf_workers is the config schema's error (tests/test_config_schema.py)
    loader = eval_loader(_crf_set(), num_workers=0)
    ev = Evaluator(loader, 3, 255, ["a", "b", "c"], Inference(Predictor()))
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count()
    assert ev.crf_workers == default_workers() == expected
    assert compose_config(["eval=msc_crf"]).eval.crf_workers is None


# -- the entries: segtrain.evaluate and scripts/crf_search.py -------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("crfsearch") / "run"
    proc = run_module("segtrain", *TINY, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    return run


def test_evaluate_and_predict_refuse_output_stride_for_deeplabv2(run_dir, tmp_path):
    cfg = _compose("evaluate", f"run={run_dir}", "eval=msc", "eval.output_stride=8",
                   "num_workers=0", "device=cpu")
    with pytest.raises(ConfigError, match="eval.output_stride=8"):
        evaluate(cfg, "msc")
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    cfg = _compose("predict", f"run={run_dir}", f"images={tmp_path / 'images'}",
                   f"out={tmp_path / 'out'}", "eval.output_stride=8", "device=cpu")
    with pytest.raises(ConfigError, match="eval.output_stride=8"):
        predict(cfg)


def test_crf_search_matches_evaluate_at_each_grid_point(run_dir, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import crf_search
    finally:
        sys.path.remove(str(REPO / "scripts"))
    result = crf_search.main([f"run={run_dir}", "--num-images", "4", "--bi-w", "3", "6",
                              "--bi-xy-std", "5", "--bi-rgb-std", "3", "40", "--workers", "2",
                              "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(result["grid"]) == 4 and "(no CRF)" in out
    # the synthetic val set of the tiny run has 4 images: each point equals the evaluation
    # of all of them with those values
    for point, miou in zip(result["grid"], result["miou"]):
        cfg = _compose("evaluate", f"run={run_dir}", "eval=msc_crf", "num_workers=0",
                       "device=cpu", "eval.crf_workers=0",
                       *(f"eval.crf.{k}={v}" for k, v in point.items()))
        assert evaluate(cfg, "msc_crf")["miou"] == pytest.approx(miou, abs=1e-12), point
    best = result["best"]
    assert result["miou"][result["grid"].index(best)] == max(result["miou"])
    pasted = _compose("evaluate", f"run={run_dir}", "eval=msc_crf")
    node = OmegaConf.create(result["yaml"]).crf
    assert node._target_ == pasted.eval.crf._target_
    assert node.pos_xy_std == pasted.eval.crf.pos_xy_std and node.iterations == 10
    assert [node.bi_w, node.bi_xy_std, node.bi_rgb_std] == \
        [best["bi_w"], best["bi_xy_std"], best["bi_rgb_std"]]
    assert result["yaml"] in out
