"""Test-time inference: Predictor modes against closed forms and explicit references, the
dense CRF on flat colour regions, and the Evaluator's confusion matrix against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segtrain.data.loader import eval_loader
from segtrain.eval.crf import DenseCRF
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.inference import Inference, Predictor

# DeepLab v1 LargeFOV's CRF values, as conf/eval/crf_v1.yaml sets them
CRF_ARGS = dict(iterations=10, pos_w=3, pos_xy_std=3, bi_w=4, bi_xy_std=121, bi_rgb_std=5)


class ConvModel(nn.Module):
    """``{"out": conv(x)}``: a kxk convolution; 1x1 makes it translation-equivariant
    without any border effect, so every window of an image sees the same logits."""

    def __init__(self, in_channels: int = 3, classes: int = 4, kernel: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(in_channels, classes, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


class SizeModel(nn.Module):
    """Constant logits ``a_k * H / ref + b_k``: each scale gives a known constant map, so
    fusion over scales has a closed form whatever the interpolation does."""

    def __init__(self, a: list[float], b: list[float], ref: int) -> None:
        super().__init__()
        self.a, self.b, self.ref = torch.tensor(a), torch.tensor(b), ref

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        value = self.a * h / self.ref + self.b
        return {"out": value.view(1, -1, 1, 1).expand(n, -1, h, w).clone()}


def test_whole_mode_is_the_model_output():
    model = ConvModel(kernel=3).eval()
    x = torch.randn(2, 3, 13, 17)
    out = Predictor(mode="whole")(model, x)
    torch.testing.assert_close(out, model(x)["out"], rtol=0, atol=0)


@pytest.mark.parametrize("size", [(23, 30), (8, 8), (5, 7)])
def test_slide_mode_equals_whole_for_a_translation_equivariant_model(size):
    # 23x30: several overlapping windows plus a last window flush with the border;
    # 8x8: exactly one crop; 5x7: smaller than the crop, padded then cut back
    model = ConvModel(kernel=1).eval()
    x = torch.randn(1, 3, *size)
    slide = Predictor(mode="slide", crop_size=8, stride=[5, 6])(model, x)
    assert slide.shape == (1, 4, *size)
    torch.testing.assert_close(slide, model(x)["out"], rtol=1e-5, atol=1e-5)


def test_slide_mode_averages_overlapping_windows():
    # a model that outputs the window's own mean everywhere: overlapping windows disagree,
    # and each pixel must get the mean over the windows that cover it
    class WindowMean(nn.Module):
        def forward(self, x):
            return {"out": x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()}

    x = torch.arange(12.0).view(1, 1, 1, 12)
    out = Predictor(mode="slide", crop_size=[1, 6], stride=[1, 3])(WindowMean(), x)
    # windows start at 0, 3, 6; their means are 2.5, 5.5, 8.5
    cover = [[2.5], [2.5], [2.5], [2.5, 5.5], [2.5, 5.5], [2.5, 5.5],
             [5.5, 8.5], [5.5, 8.5], [5.5, 8.5], [8.5], [8.5], [8.5]]
    expected = torch.tensor([sum(c) / len(c) for c in cover]).view(1, 1, 1, 12)
    torch.testing.assert_close(out, expected)


def test_multi_scale_max_fusion_closed_form():
    a, b = [1.0, -1.0, 0.0], [0.0, 1.0, 0.6]
    model = SizeModel(a, b, ref=16)
    out = Predictor(scales=[0.5, 1.0, 1.5], fusion="max")(model, torch.zeros(1, 3, 16, 16))
    # channel k at scale s is a_k * s + b_k; the max over s = 0.5, 1, 1.5
    expected = [max(ak * s + bk for s in (0.5, 1.0, 1.5)) for ak, bk in zip(a, b)]
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))
    assert torch.equal(out, out[:, :, :1, :1].expand_as(out))


def test_multi_scale_mean_fusion_closed_form():
    a, b = [1.0, -2.0], [0.5, 0.0]
    model = SizeModel(a, b, ref=16)
    out = Predictor(scales=[0.5, 0.75, 1.0], fusion="mean")(model, torch.zeros(1, 3, 16, 16))
    expected = [ak * 0.75 + bk for ak, bk in zip(a, b)]  # mean of the scales is 0.75
    torch.testing.assert_close(out[0, :, 5, 7], torch.tensor(expected))


def _upsampled_per_scale(model: nn.Module, x: torch.Tensor, scales) -> list[torch.Tensor]:
    logits = []
    for s in scales:
        xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        out = model(xs)["out"]
        logits.append(F.interpolate(out, size=x.shape[-2:], mode="bilinear",
                                    align_corners=False))
    return logits


def test_multi_scale_max_fusion_is_the_elementwise_maximum_of_upsampled_logits():
    model = ConvModel(kernel=3).eval()
    x = torch.randn(1, 3, 20, 24)
    scales = [0.5, 0.75, 1.0]
    per_scale = _upsampled_per_scale(model, x, scales)
    expected = torch.maximum(torch.maximum(per_scale[0], per_scale[1]), per_scale[2])
    out = Predictor(scales=scales, fusion="max")(model, x)
    torch.testing.assert_close(out, expected)
    # max fusion really differs from each single scale and from the mean here
    mean = Predictor(scales=scales, fusion="mean")(model, x)
    torch.testing.assert_close(mean, sum(per_scale) / 3)
    assert not torch.allclose(out, mean)


def test_flip_averaging_on_a_mirror_symmetric_input():
    # an asymmetric kernel: the model is not flip-equivariant, so m(x) is not symmetric
    model = ConvModel(kernel=3, seed=3).eval()
    half = torch.randn(1, 3, 9, 6)
    x = torch.cat([half, half.flip(-1)], dim=-1)  # x == x.flip(-1)
    plain = model(x)["out"]
    assert not torch.allclose(plain, plain.flip(-1), atol=1e-4)
    out = Predictor(flip=True)(model, x)
    torch.testing.assert_close(out, 0.5 * (plain + plain.flip(-1)))
    torch.testing.assert_close(out, out.flip(-1))


def test_slide_without_crop_and_stride_is_a_clear_error():
    # a wrong mode or fusion is the config schema's error (tests/test_config_schema.py)
    with pytest.raises(ValueError, match="needs eval.predictor.crop_size and "
                                         "eval.predictor.stride"):
        Predictor(mode="slide", crop_size=8)


# -- dense CRF -------------------------------------------------------------------------------
def _two_regions(h: int = 20, w: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Left half flat red (label 0), right half flat blue (label 1)."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 30, 30)
    rgb[:, w // 2:] = (30, 30, 200)
    labels = np.zeros((h, w), np.int64)
    labels[:, w // 2:] = 1
    return rgb, labels


def test_dense_crf_returns_a_probability_map():
    rgb, _ = _two_regions(6, 8)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(6, 8)).transpose(2, 0, 1).astype(np.float32)
    q = DenseCRF(**CRF_ARGS)(rgb, probs)
    assert q.shape == (3, 6, 8) and q.dtype == np.float32
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


def test_dense_crf_cleans_noisy_probabilities_on_flat_colour_regions():
    rgb, labels = _two_regions()
    rgb.setflags(write=False)  # as np.asarray(PIL image) gives it
    rng = np.random.default_rng(1)
    # right label with p=0.65, but 30% of the pixels flipped to the wrong one
    confidence = np.where(rng.random(labels.shape) < 0.3, 0.35, 0.65)
    p1 = np.where(labels == 1, confidence, 1 - confidence)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    before = (probs.argmax(0) == labels).mean()
    after = (DenseCRF(**CRF_ARGS)(rgb, probs).argmax(0) == labels).mean()
    assert 0.6 < before < 0.8
    assert after > 0.98, f"CRF agreement {after:.3f} (before {before:.3f})"


# -- evaluator -------------------------------------------------------------------------------
class OneHotSet(torch.utils.data.Dataset):
    """Items whose image channels are the one-hot encoding of a chosen prediction, so an
    identity model predicts exactly that map."""

    class_names = ("a", "b", "c")

    def __init__(self, preds: list[np.ndarray], masks: list[np.ndarray]) -> None:
        self.preds, self.masks = preds, masks

    def __len__(self) -> int:
        return len(self.preds)

    def __getitem__(self, i: int) -> dict:
        image = F.one_hot(torch.from_numpy(self.preds[i]), 3).permute(2, 0, 1).float()
        rgb = (255 * image).byte().permute(1, 2, 0)  # "the image as read", for the figures
        return {"image": image, "mask": torch.from_numpy(self.masks[i]), "rgb": rgb,
                "meta": {"index": i}}


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x}


def test_evaluator_confusion_matrix_matches_numpy():
    rng = np.random.default_rng(0)
    sizes = [(5, 7), (6, 4), (3, 9)]  # different sizes: the loader's batch size is 1
    preds = [rng.integers(0, 3, s) for s in sizes]
    masks = [rng.integers(0, 3, s) for s in sizes]
    for m in masks:
        m[rng.random(m.shape) < 0.2] = 255  # ignored pixels never count
    dataset = OneHotSet(preds, masks)
    evaluator = Evaluator(eval_loader(dataset, num_workers=0), num_classes=3, ignore_index=255,
                          class_names=dataset.class_names, inference=Inference(Predictor()),
                          num_samples=2)
    scores = evaluator.run(Identity(), torch.device("cpu"))

    expected = np.zeros((3, 3), np.int64)
    for p, m in zip(preds, masks):
        keep = m != 255
        np.add.at(expected, (m[keep], p[keep]), 1)
    assert np.array_equal(np.array(scores["confusion_matrix"]), expected)
    tp = np.diag(expected)
    iou = tp / (expected.sum(0) + expected.sum(1) - tp)
    assert scores["miou"] == pytest.approx(iou.mean())
    assert scores["pixel_acc"] == pytest.approx(tp.sum() / expected.sum())
    assert len(evaluator.samples) == 2
    assert np.array_equal(evaluator.samples[1]["pred"], preds[1])
