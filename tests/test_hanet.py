"""HANet (Choi et al., "Cars Can't Fly up in the Sky", CVPR 2020) as its authors' code
builds it: the attention per (channel, row) and its positional encoding against the closed
form and the reference's table, the auxiliary output, the dilation of the first blocks of
layer3/layer4, the "max" pooling of the height attention, the parameter count by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.losses.ce import CrossEntropyLoss
from segtrain.models.backbones.build import set_backbone_output_stride
from segtrain.models.deeplabv3 import DeepLabV3Plus
from segtrain.models.hanet import HANet
from segtrain.models.modules.height_attention import HeightAttention, positional_encoding
from tests.conftest import model_from_yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
K = 3

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def small_hanet(attach=("layer1", "layer2", "layer3", "layer4"), aux: int | None = 32,
                backbone: str = "resnet18", dropout: float = 0.1) -> HANet:
    # the reference's dilation layout (every block of layer3 / layer4 dilated) needs a ResNet
    contract = not backbone.startswith("resnet")
    return HANet(K, backbone, 8, None, contract, (6, 12, 18), 0.0, False, 48, 64, list(attach),
                 16, 64, 3, dropout, 100.0, aux, dropout, None)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def reference_encoding_table(rows: int, width: int) -> np.ndarray:
    """shachoi/HANet network/PosEmbedding.py: get_sinusoid_encoding_table(rows, width) + 1
    (PosEncoding1D), wavelength base 100 for widths up to 50, as (width, rows)."""
    base = 10 if width > 50 else 100
    angle = np.array([[p / base ** (2 * (j // 2) / width) for j in range(width)]
                      for p in range(rows)])
    angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    return (angle + 1).T


def height_attention_params(c_low: int, c_high: int, r: int, k: int) -> int:
    """By hand: 1x1 conv (no bias) + BN, 3x3 conv to 2m (no bias) + BN, k conv with bias."""
    m = math.ceil(c_low / r)
    return c_low * m + 2 * m + m * 2 * m * 3 + 2 * 2 * m + 2 * m * c_high * k + c_high

# ---- parameter counts against the reference code --------------------------------------------

def reference_model(name: str, **override) -> nn.Module:
    with torch.device("meta"):
        return model_from_yaml(name, 19, **override)


# ---- HANet ----------------------------------------------------------------------------------

def dilated_hanet(contract_dilation: bool, output_stride: int = 8, aux: int | None = 16):
    return HANet(K, "resnet18", output_stride, None, contract_dilation, (6, 12, 18), 0.0,
                 False, 48, 32, ["layer1", "layer4"], 16, 64, 3, 0.0, 100.0, aux, 0.1, None)


def _dilations(stage: nn.Sequential) -> list[int]:
    return [m.dilation[0] for m in stage.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def test_hanet_config_errors():
    with pytest.raises(ConfigError, match="model.attach"):
        small_hanet(attach=("layer1", "layer6"))


def test_hanet_aux_output_follows_config():
    assert small_hanet(aux=None).output_keys == {"out"}
    model = small_hanet(aux=16)
    assert model.output_keys == {"out", "aux"}
    # the auxiliary logits stay at stride 8, ceil(33 / 8) x ceil(35 / 8), as the reference's
    assert model.train()(torch.randn(2, 3, 33, 35))["aux"].shape == (2, K, 5, 5)


# ---- HANet --------------------------------------------------------------------------------

def test_hanet_attention_one_value_per_channel_and_row_constant_along_width():
    torch.manual_seed(0)
    module = HeightAttention(12, 7, 16, 4, 3, 0.0).eval()
    low = torch.randn(2, 12, 20, 9)
    high = torch.randn(2, 7, 10, 13)
    with torch.no_grad():
        a = module.attention(low, 10)
        out = module(low, high)
        ones = module(low, torch.ones_like(high))
    assert a.shape == (2, 7, 10)  # (batch, channel, row)
    assert ((a > 0) & (a < 1)).all()
    assert torch.equal(ones, ones[..., :1].expand_as(ones))  # constant along the width
    assert torch.allclose(ones[..., 0], a)
    assert torch.allclose(out, high * a[..., None])
    assert a.std(dim=2).mean() > 0  # rows differ
    # the attention depends on the lower-level map's rows only through width-wise pooling
    with torch.no_grad():
        shuffled = module.attention(low[..., torch.randperm(9)], 10)
    assert torch.allclose(shuffled, a, atol=1e-6)


def test_positional_encoding_matches_closed_form():
    length, channels, base = 16, 6, 100.0
    pe = positional_encoding(length, channels, base).numpy()
    ref = np.zeros((channels, length))
    for p in range(length):
        for i in range(channels // 2):
            ref[2 * i, p] = math.sin(p / base ** (2 * i / channels))
            ref[2 * i + 1, p] = math.cos(p / base ** (2 * i / channels))
    assert np.allclose(pe, ref, atol=1e-6)
    assert positional_encoding(5, 7, 100.0).shape == (7, 5)  # odd width: the last is a sine


def test_positional_encoding_is_added_after_the_first_convolution():
    torch.manual_seed(0)
    module = HeightAttention(64, 8, 16, 8, 3, 0.0).eval()
    seen = {}
    hooks = [module.conv1.register_forward_hook(lambda m, i, o: seen.update(q1=o.clone())),
             module.conv2.register_forward_hook(lambda m, i, o: seen.update(q2_in=i[0]))]
    with torch.no_grad():
        module.attention(torch.randn(1, 64, 32, 5), 32)
    for h in hooks:
        h.remove()
    assert module.pe.shape == (8, 17)  # ceil(64 / 8) channels, coarse rows 0..16
    assert torch.allclose(seen["q2_in"], seen["q1"] + module.pe[:, :16])


def test_hanet_config_adds_the_reference_encoding_table():
    """The configured model adds sinusoid + 1 after the first conv, as the reference code
    (the +1 changes the logits: scripts/reference/compare_hanet.py, docs/reference/hanet.md)."""
    model = model_from_yaml("hanet", K, backbone="resnet18")
    for module in model.attention.values():
        width = module.conv1[0].out_channels
        assert np.allclose(module.pe.numpy(), reference_encoding_table(17, width), atol=1e-6)
    assert np.allclose(HeightAttention(64, 8, 16, 8, 3, 0.0, pe_offset=0.0).pe.numpy(),
                       reference_encoding_table(17, 8) - 1, atol=1e-6)  # the paper's PE


def test_hanet_parameter_count_by_hand():
    assert n_params(HeightAttention(1024, 2048, 16, 64, 3, 0.1)) == 216_672
    assert height_attention_params(1024, 2048, 64, 3) == 216_672
    with torch.device("meta"):
        model = model_from_yaml("hanet", 19)
        plain = DeepLabV3Plus(19, "resnet101s", 8, None, (6, 12, 18), 0.0, False, 48, 256,
                              None)
    # the paper's best model: layer1-4 on ResNet-101 (deep stem; c4 1024, c5 2048, ASPP
    # 5 x 256)
    hanet = (height_attention_params(1024, 2048, 64, 3)
             + height_attention_params(2048, 1280, 64, 3)
             + height_attention_params(1280, 256, 64, 3)
             + height_attention_params(304, 256, 64, 3))
    aux = 1024 * 512 * 9 + 2 * 512 + 512 * 19 + 19
    assert n_params(model.attention) == hanet == 604_316
    assert n_params(model) == n_params(plain) + hanet + aux


def test_hanet_dilates_the_first_block_of_layer3_and_layer4():
    """Reference variant D: every 3x3 of layer3 at 2, of layer4 at 4; no stride after
    layer2. torchvision's layout (contract_dilation) keeps 1 and 2 in the first blocks."""
    ref = reference_model("hanet").backbone
    assert set(_dilations(ref.layer3)) == {2} and set(_dilations(ref.layer4)) == {4}
    assert all(m.stride == (1, 1) for layer in (ref.layer3, ref.layer4)
               for m in layer.modules() if isinstance(m, nn.Conv2d))
    tv = dilated_hanet(True).backbone
    assert _dilations(tv.layer3) == [1, 2, 2, 2] and _dilations(tv.layer4) == [2, 4, 4, 4]
    model = dilated_hanet(False)
    assert _dilations(model.backbone.layer3) == [2] * 4
    # switching the output stride keeps the layout: at 16 layer4 is at 2 throughout
    model.set_output_stride(16)
    assert _dilations(model.backbone.layer4) == [2] * 4
    assert model.backbone.layer3[0].conv1.stride == (2, 2)
    set_backbone_output_stride(model.backbone, "resnet18", 8)
    assert _dilations(model.backbone.layer4) == [4] * 4


def test_hanet_first_block_dilation_changes_the_logits_with_the_same_weights():
    torch.manual_seed(0)
    ref, tv = dilated_hanet(False).eval(), dilated_hanet(True).eval()
    tv.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert not torch.allclose(ref(x)["out"], tv(x)["out"], atol=1e-3)


def test_hanet_aux_is_at_stride_8_against_nearest_labels():
    torch.manual_seed(0)
    model = dilated_hanet(False).train()
    out = model(torch.randn(2, 3, 33, 47))
    assert out["out"].shape == (2, K, 33, 47)
    assert out["aux"].shape == (2, K, 5, 6)  # ceil(33 / 8) x ceil(47 / 8)
    mask = torch.randint(0, K, (2, 33, 47))
    terms = CrossEntropyLoss(255, None, 0.4)(out, {"mask": mask})
    rows = [round(i * 32 / 4) for i in range(5)]  # one label per cell, no interpolation
    cols = [round(j * 46 / 5) for j in range(6)]
    expected = F.cross_entropy(out["aux"], mask[:, rows][:, :, cols])
    assert torch.allclose(terms["aux"], expected)


@pytest.mark.parametrize("height", [32, 20])
def test_height_attention_max_pooling_is_the_max_over_each_band(height):
    """The reference's AdaptiveMaxPool2d((H^, 1)): the max over the band's rows and the whole
    width (not the mean of the row maxima); "mean" is the mean over the same cells."""
    torch.manual_seed(0)
    low = torch.randn(2, 8, height, 5)
    a = low.numpy()
    pooled = {}
    for pooling in ("max", "mean"):
        module = HeightAttention(8, 4, 16, 4, 3, 0.0, pooling).eval()
        module.conv1.register_forward_pre_hook(lambda m, i, p=pooling: pooled.update({p: i[0]}))
        with torch.no_grad():
            module.attention(low, 10)
        expected = np.zeros((2, 8, 16))
        for k in range(16):  # adaptive pooling's band k: rows floor(kH/16) .. ceil((k+1)H/16)
            band = a[:, :, k * height // 16: -(-(k + 1) * height // 16), :]
            expected[:, :, k] = band.max(axis=(2, 3)) if pooling == "max" else \
                band.mean(axis=(2, 3))
        assert np.allclose(pooled[pooling].numpy(), expected, atol=1e-6), pooling
    if height == 32:  # two rows per band: the former rule (mean of row maxima) differs
        mean_of_row_max = a.max(axis=3).reshape(2, 8, 16, 2).mean(axis=3)
        assert not np.allclose(pooled["max"].numpy(), mean_of_row_max, atol=1e-3)
