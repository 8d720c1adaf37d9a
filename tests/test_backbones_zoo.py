"""MobileNetV2 / Xception-65 backbones and ``build_backbone``: torchvision key format,
parameter counts, output strides, in-place re-dilation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segtrain.models.backbones.build import (
    BACKBONES,
    build_backbone,
    set_backbone_output_stride,
)
from segtrain.models.backbones.mobilenet import MobileNetV2, mobilenet_v2
from segtrain.models.backbones.xception import Xception, xception65

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def torchvision_mobilenet_v2_state() -> dict[str, torch.Tensor]:
    """A state_dict with torchvision ``mobilenet_v2``'s keys and shapes, written from its
    naming scheme alone (``torchvision/models/mobilenetv2.py``: ``features.0`` is a
    Conv2dNormActivation (``.0`` conv, ``.1`` BN); each InvertedResidual holds ``conv``, a
    Sequential of [expansion ConvNormAct (t != 1)], depthwise ConvNormAct, 1x1 conv, BN;
    ``features.18`` is the 1x1 ConvNormAct to 1280; ``classifier`` = Dropout, Linear)."""
    g = torch.Generator().manual_seed(2)
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * 0.1

    def bn(name: str, c: int) -> None:
        state[f"{name}.weight"] = torch.rand(c, generator=g) + 0.5
        state[f"{name}.bias"] = torch.randn(c, generator=g) * 0.1
        state[f"{name}.running_mean"] = torch.randn(c, generator=g) * 0.1
        state[f"{name}.running_var"] = torch.rand(c, generator=g) + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("features.0.0", 32, 3, 3)
    bn("features.0.1", 32)
    setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
               (6, 320, 1)]  # (t, c, n) of Sandler et al. Table 2
    idx, inp = 1, 32
    for t, c, n in setting:
        for _ in range(n):
            p, hidden, j = f"features.{idx}.conv", inp * t, 0
            if t != 1:
                conv(f"{p}.0.0", hidden, inp, 1)
                bn(f"{p}.0.1", hidden)
                j = 1
            state[f"{p}.{j}.0.weight"] = torch.randn(hidden, 1, 3, 3, generator=g) * 0.1
            bn(f"{p}.{j}.1", hidden)
            conv(f"{p}.{j + 1}", c, hidden, 1)
            bn(f"{p}.{j + 2}", c)
            idx, inp = idx + 1, c
    conv("features.18.0", 1280, 320, 1)
    bn("features.18.1", 1280)
    state["classifier.1.weight"] = torch.randn(1000, 1280, generator=g) * 0.01
    state["classifier.1.bias"] = torch.zeros(1000)
    return state


def test_mobilenet_v2_keys_shapes_and_count_equal_torchvision():
    net = MobileNetV2()
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in torchvision_mobilenet_v2_state().items()}
    assert list(ours) == list(theirs)  # same names, same order
    assert ours == theirs
    # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 meta: "num_params": 3504872
    assert n_params(net) == 3_504_872


def test_mobilenet_v2_torchvision_checkpoint_loads_strictly(tmp_path):
    state = torchvision_mobilenet_v2_state()
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(state, path)
    net = mobilenet_v2(output_stride=16, pretrained=str(path))
    assert torch.equal(net.features[5].conv[1][0].weight, state["features.5.conv.1.0.weight"])
    assert torch.equal(net.classifier[1].weight, state["classifier.1.weight"])
    # a depth channel starts at the mean of the RGB filters
    rgbd = mobilenet_v2(pretrained=str(path), in_channels=4)
    w = rgbd.features[0][0].weight
    assert w.shape == (32, 4, 3, 3)
    assert torch.allclose(w[:, 3], state["features.0.0.weight"].mean(dim=1))
    assert torch.equal(w[:, :3], state["features.0.0.weight"])


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_mobilenet_v2_strides_and_channels(output_stride):
    net = build_backbone("mobilenetv2", output_stride, None).eval()
    with torch.no_grad():
        feats = net.forward_features(torch.randn(1, 3, 64, 64))
    nominal = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    for key, x in feats.items():
        assert x.shape[1] == net.feature_channels[key]
        assert x.shape[-1] == 64 // min(nominal[key], output_stride)
    assert net.feature_channels == {"c2": 24, "c3": 32, "c4": 96, "c5": 320}


def test_mobilenet_v2_dilation_follows_tensorflow_rule():
    """At output stride 16 the block that would stride (features.14) keeps rate 1 with
    stride 1 and the later blocks use rate 2; at 8, blocks 7.. use 2 and 15.. use 4."""
    def rates(net):
        return [(b.conv[-3][0].stride[0], b.conv[-3][0].dilation[0]) for b in net.features[1:18]]

    os16 = rates(MobileNetV2(16))
    assert os16[13] == (1, 1) and os16[14:] == [(1, 2)] * 3
    assert os16[:13] == rates(MobileNetV2(32))[:13]
    os8 = rates(MobileNetV2(8))
    assert os8[6] == (1, 1) and os8[7:13] == [(1, 2)] * 6
    assert os8[13] == (1, 2) and os8[14:] == [(1, 4)] * 3


def xception65_param_count(num_classes: int = 1000) -> int:
    """Closed form from the official layout (entry 3 / middle 16 / exit 2 units)."""
    def sep(cin, cout):  # depthwise 3x3 + BN, pointwise 1x1 + BN (no biases)
        return cin * 9 + 2 * cin + cin * cout + 2 * cout

    def unit(cin, depths, shortcut):
        total, c = 0, cin
        for d in depths:
            total, c = total + sep(c, d), d
        return total + (cin * depths[-1] + 2 * depths[-1] if shortcut else 0)

    stem = 3 * 32 * 9 + 2 * 32 + 32 * 64 * 9 + 2 * 64
    entry = unit(64, [128] * 3, True) + unit(128, [256] * 3, True) + unit(256, [728] * 3, True)
    middle = 16 * unit(728, [728] * 3, False)
    exit_ = unit(728, [728, 1024, 1024], True) + unit(1024, [1536, 1536, 2048], False)
    return stem + entry + middle + exit_ + 2048 * num_classes + num_classes


def test_xception65_parameter_count():
    net = Xception()
    assert n_params(net) == xception65_param_count() == 39_916_312
    # timm's xception65 (same aligned Xception-65, TF-ported) reports 39.9M parameters
    assert round(n_params(net) / 1e6, 1) == 39.9
    assert n_params(net.drop_classifier()) == 37_867_312


@pytest.mark.parametrize("output_stride", [8, 16])
def test_xception65_strides_and_low_level(output_stride):
    net = build_backbone("xception65", output_stride, None).eval()
    with torch.no_grad():
        feats = net.forward_features(torch.randn(1, 3, 64, 64))
    assert feats["c2"].shape == (1, 256, 16, 16)  # stride-4 decoder input of DeepLab v3+
    assert feats["c3"].shape == (1, 256, 8, 8)
    assert feats["c4"].shape[-1] == 64 // min(16, output_stride)
    assert feats["c5"].shape == (1, 2048, 64 // output_stride, 64 // output_stride)


def test_xception_has_no_maxpool_and_bn_after_every_depthwise():
    net = Xception(middle_blocks=1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    depthwise = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    seps = [m for m in net.modules() if type(m).__name__ == "SeparableConv2d"]
    assert len(depthwise) == len(seps) == 3 * 6
    assert all(isinstance(s.bn_depthwise, nn.BatchNorm2d) for s in seps)
    # strided units stride their third separable conv and their shortcut
    assert net.entry_flow[0].convs[2].depthwise.stride == (2, 2)
    assert net.entry_flow[0].shortcut[0].stride == (2, 2)


def test_xception65_imagenet_is_refused_with_advice():
    with pytest.raises(ValueError, match="cannot obtain Xception-65 ImageNet weights .* "
                       "model.pretrained=<path or URL>"):
        xception65(pretrained="imagenet")


def _geometry(net: nn.Module) -> dict:
    return {name: (m.stride, m.padding, m.dilation) for name, m in net.named_modules()
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d))}


@pytest.mark.parametrize("name,multi_grid", [("resnet18", (1, 2)), ("resnet50", None),
                                             ("mobilenetv2", None), ("vgg16", None),
                                             ("xception65", (1, 2, 4))])
def test_set_output_stride_matches_a_fresh_build(name, multi_grid):
    net = build_backbone(name, 16, None, multi_grid)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for target in (8, 32, 16):
        set_backbone_output_stride(net, name, target, multi_grid)
        with torch.device("meta"):  # geometry only: skip allocating and initialising
            fresh = build_backbone(name, target, None, multi_grid)
        assert _geometry(net) == _geometry(fresh)
        assert net.output_stride == target
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name,multi_grid", [("resnet50", None), ("mobilenetv2", None),
                                             ("xception65", (1, 2, 4))])
def test_atrous_features_subsample_to_strided_features(name, multi_grid):
    """Atrous conversion is exact: the output-stride-16 (8) features taken every 2nd (4th)
    pixel equal the stride-32 features of the same weights (zero padding included).

    (ResNet with multi-grid is left out on purpose: there layer4.0's strided 3x3 takes the
    rate 2 x grid[0] at output stride 16, DeepLab v3's stated rates, which is not the
    equivalence-preserving rate 1 of torchvision's layout.)"""
    # float64: the equality is exact up to summation order, which float32 (randomly
    # initialised, unseeded) blurred past any fixed tolerance in some test orders
    net = build_backbone(name, 32, None, multi_grid).double().eval()
    x = torch.randn(1, 3, 65, 50, dtype=torch.float64)
    with torch.no_grad():
        c5 = net.forward_features(x)["c5"]
        for target, step in ((16, 2), (8, 4)):
            set_backbone_output_stride(net, name, target, multi_grid)
            dense = net.forward_features(x)["c5"]
            torch.testing.assert_close(dense[..., ::step, ::step], c5, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "xception65"])
def test_in_channels_four(name):
    net = build_backbone(name, 16, None, in_channels=4).eval()
    with torch.no_grad():
        feats = net.forward_features(torch.randn(1, 4, 32, 32))
    assert feats["c5"].shape[-1] == 2


def test_build_backbone_drops_classifiers_and_rejects_unknown_names():
    with torch.device("meta"):  # structure only
        for name in BACKBONES:
            net = build_backbone(name, 32, None)
            assert all(not isinstance(m, nn.Linear) for m in net.modules()), name
            assert set(net.feature_channels) == {"c2", "c3", "c4", "c5"}
        # torchvision's ResNet-101 (44,549,160) without its 2048 x 1000 fc
        assert n_params(build_backbone("resnet101", 16, None)) == 44_549_160 - 2_049_000
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet99", 16, None)
    with pytest.raises(ValueError, match="multi-grid"):
        build_backbone("mobilenetv2", 16, None, multi_grid=(1, 2, 4))
