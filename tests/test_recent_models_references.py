"""The recent models as their authors' code builds them (issue 15).

Deep stems that load the three key layouts a deep-stem ImageNet ResNet comes in (each
checkpoint built here by a module in that codebase's naming, and the loaded backbone
computing what that module computes); parameter counts against those of the reference
code; HANet's dilation, stride-8 auxiliary output and "max" pooling; CPNet's affinity loss
without the diagonal on a hand-computed example; SPNet's bias-free strip convolutions;
DSRL's deconvolution at the border.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from segtrain.losses.affinity import affinity_terms, ideal_affinity
from segtrain.losses.ce import CrossEntropyLoss
from segtrain.models.backbones.build import build_backbone, set_backbone_output_stride
from segtrain.models.backbones.resnet import BasicBlock, ResNet
from segtrain.models.hanet import HANet
from segtrain.models.modules.height_attention import HeightAttention
from segtrain.models.modules.strip_pooling import StripPoolingModule
from tests.conftest import CONF_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


# ---- deep stems: three checkpoint layouts -------------------------------------------------

class _Trunk(nn.Module):
    """maxpool + layer1..4 (the same keys in every layout) + an ImageNet fc."""

    def __init__(self, width: int, fc: bool) -> None:
        super().__init__()
        donor = ResNet(BasicBlock, (2, 2, 2, 2), stem_width=width)  # ResNet-18
        self.layer1, self.layer2 = donor.layer1, donor.layer2
        self.layer3, self.layer4 = donor.layer3, donor.layer4
        if fc:
            self.fc = nn.Linear(512, 1000)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class CsailLayout(_Trunk):
    """CSAIL's / HANet's ``ResNet3X3``: flat conv1, bn1, conv2, bn2, conv3, bn3."""

    def __init__(self, width: int) -> None:
        super().__init__(width, fc=True)
        self.conv1, self.bn1 = conv3x3(3, width, 2), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = conv3x3(width, 2 * width), nn.BatchNorm2d(2 * width)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.trunk(F.relu(self.bn3(self.conv3(x))))


class MmsegLayout(_Trunk):
    """mmsegmentation's ``ResNetV1c``: ``stem`` = 3 x (conv, BN, ReLU); no classifier."""

    def __init__(self, width: int) -> None:
        super().__init__(width, fc=False)
        self.stem = nn.Sequential(conv3x3(3, width, 2), nn.BatchNorm2d(width), nn.ReLU(),
                                  conv3x3(width, width), nn.BatchNorm2d(width), nn.ReLU(),
                                  conv3x3(width, 2 * width), nn.BatchNorm2d(2 * width),
                                  nn.ReLU())

    def forward(self, x):
        return self.trunk(self.stem(x))


class EncodingLayout(_Trunk):
    """PyTorch-Encoding's ``resnet*s``: ``conv1`` = conv, BN, ReLU, conv, BN, ReLU, conv;
    then ``bn1``."""

    def __init__(self, width: int) -> None:
        super().__init__(width, fc=True)
        self.conv1 = nn.Sequential(conv3x3(3, width, 2), nn.BatchNorm2d(width), nn.ReLU(),
                                   conv3x3(width, width), nn.BatchNorm2d(width), nn.ReLU(),
                                   conv3x3(width, 2 * width))
        self.bn1 = nn.BatchNorm2d(2 * width)

    def forward(self, x):
        return self.trunk(F.relu(self.bn1(self.conv1(x))))


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2),
                                  (m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 2.0)):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)


@pytest.mark.parametrize("layout,name", [(CsailLayout, "resnet18s"),
                                         (EncodingLayout, "resnet18s"),
                                         (MmsegLayout, "resnet18_v1c")])
def test_deep_stem_loads_each_layout_and_computes_the_same(layout, name, tmp_path):
    width = 64 if name.endswith("s") else 32
    torch.manual_seed(0)
    theirs = layout(width).eval()
    _randomise(theirs)
    path = tmp_path / "imagenet.pth"
    torch.save(theirs.state_dict(), path)
    ours = build_backbone(name, 32, str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x)["c5"], theirs(x), atol=1e-5)


def test_deep_stem_widths_and_keys():
    with torch.device("meta"):
        s = build_backbone("resnet101s", 8, None)
        v1c = build_backbone("resnet101_v1c", 8, None)
    assert [m.out_channels for m in s.conv1 if isinstance(m, nn.Conv2d)] == [64, 64, 128]
    assert [m.out_channels for m in v1c.conv1 if isinstance(m, nn.Conv2d)] == [32, 32, 64]
    assert s.layer1[0].conv1.in_channels == 128 and v1c.layer1[0].conv1.in_channels == 64
    stem = {k.rsplit(".", 1)[0] for k in s.state_dict() if k.startswith(("conv1", "bn1"))}
    assert stem == {"conv1.0", "conv1.1", "conv1.3", "conv1.4", "conv1.6", "bn1"}
    # by hand: 3x3 convs 3->w->w->2w, BN on each; layer1's inputs grow from 64 to 2w
    for net, w in ((s, 64), (v1c, 32)):
        stem_params = 9 * (3 * w + w * w + w * 2 * w) + 2 * (w + w + 2 * w)
        extra_in = (2 * w - 64) * (64 + 256)  # layer1.0.conv1 and its downsample conv
        assert n_params(net) == 42_500_160 - (49 * 3 * 64 + 2 * 64) + stem_params + extra_in


def test_deep_stem_imagenet_without_a_known_file_says_so():
    with pytest.raises(ValueError, match="no ImageNet checkpoint known for resnet152s"):
        build_backbone("resnet152s", 8, "imagenet")


# ---- parameter counts against the reference code --------------------------------------------

def paper_model(name: str, **override) -> nn.Module:
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    cfg.pop("defaults")  # the optimizer policy it picks, not a constructor argument
    cfg.num_classes = 19
    for key, value in override.items():
        cfg[key] = value
    with torch.device("meta"):
        return instantiate(cfg)


def test_parameter_counts_match_the_reference_code():
    """shachoi/HANet (ResNet-101, 19 classes) 64,803,149; houqb/SPNet 66,729,382;
    ContextPrior on mmsegmentation (prior 64 x 64) 71,146,118. HANet differs by exactly
    the choices hanet.py states: frozen positional tables of 17 rows, a bias before BN in
    each module's second conv and in the auxiliary head's 3x3 conv."""
    hanet = paper_model("hanet")
    mids = [m.conv1[0].out_channels for m in hanet.attention.values()]
    assert mids == [16, 32, 20, 5]  # ceil(C_l / 64) for C_l = 1024, 2048, 1280, 304
    tables = sum(17 * m for m in mids)
    biases = sum(2 * m for m in mids) + hanet.aux_head[0][0].out_channels
    assert n_params(hanet) + tables + biases == 64_803_149
    assert n_params(paper_model("spnet")) == 66_729_382
    assert n_params(paper_model("cpnet", prior_size=[64, 64])) == 71_146_118


# ---- HANet ----------------------------------------------------------------------------------

def small_hanet(contract_dilation: bool, output_stride: int = 8, aux: int | None = 16):
    return HANet(K, "resnet18", output_stride, None, contract_dilation, (6, 12, 18), 0.0,
                 False, 48, 32, ["layer1", "layer4"], 16, 64, 3, 0.0, 100.0, aux, 0.1, None)


def _dilations(stage: nn.Sequential) -> list[int]:
    return [m.dilation[0] for m in stage.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def test_hanet_dilates_the_first_block_of_layer3_and_layer4():
    """Reference variant D: every 3x3 of layer3 at 2, of layer4 at 4; no stride after
    layer2. torchvision's layout (contract_dilation) keeps 1 and 2 in the first blocks."""
    ref = paper_model("hanet").backbone
    assert set(_dilations(ref.layer3)) == {2} and set(_dilations(ref.layer4)) == {4}
    assert all(m.stride == (1, 1) for layer in (ref.layer3, ref.layer4)
               for m in layer.modules() if isinstance(m, nn.Conv2d))
    tv = small_hanet(True).backbone
    assert _dilations(tv.layer3) == [1, 2, 2, 2] and _dilations(tv.layer4) == [2, 4, 4, 4]
    model = small_hanet(False)
    assert _dilations(model.backbone.layer3) == [2] * 4
    # switching the output stride keeps the layout: at 16 layer4 is at 2 throughout
    model.set_output_stride(16)
    assert _dilations(model.backbone.layer4) == [2] * 4
    assert model.backbone.layer3[0].conv1.stride == (2, 2)
    set_backbone_output_stride(model.backbone, "resnet18", 8)
    assert _dilations(model.backbone.layer4) == [4] * 4


def test_hanet_first_block_dilation_changes_the_logits_with_the_same_weights():
    torch.manual_seed(0)
    ref, tv = small_hanet(False).eval(), small_hanet(True).eval()
    tv.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert not torch.allclose(ref(x)["out"], tv(x)["out"], atol=1e-3)


def test_hanet_aux_is_at_stride_8_against_nearest_labels():
    torch.manual_seed(0)
    model = small_hanet(False).train()
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


# ---- CPNet's affinity loss -----------------------------------------------------------------

# a 2 x 2 grid, labels [[0, 0], [1, 255]]: positions 0 and 1 share class 0, position 2 is
# alone in class 1, position 3 is ignored. Rows of P (position i towards j); column 3 and
# row 3 never count.
P = torch.tensor([[0.9, 0.6, 0.2, 0.5],
                  [0.5, 0.8, 0.4, 0.5],
                  [0.3, 0.1, 0.7, 0.5],
                  [0.5, 0.5, 0.5, 0.5]])[None]
MASK = torch.tensor([[[0, 0], [1, 255]]])


def test_affinity_loss_by_hand_without_the_diagonal():
    a, valid = ideal_affinity(MASK, (2, 2), 255)
    assert valid.tolist() == [[True, True, True, False]]
    unary, global_ = affinity_terms(P, a, valid)
    log = math.log
    # unary: BCE over the 9 valid pairs, diagonal included (a = 1 on 00, 01, 10, 11, 22)
    same, other = [0.9, 0.6, 0.5, 0.8, 0.7], [0.2, 0.4, 0.3, 0.1]
    assert unary.item() == pytest.approx(
        -(sum(map(log, same)) + sum(log(1 - p) for p in other)) / 9, rel=1e-6)
    # row 0: recall p01 / 1, precision p01 / (p00 + p01 + p02), specificity (1 - p02) / 1
    row0 = -(log(0.6) + log(0.6 / 1.7) + log(0.8))
    row1 = -(log(0.5) + log(0.5 / 1.7) + log(0.6))
    row2 = -log((0.7 + 0.9) / 2)  # alone in its class: specificity only
    assert global_.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)
    # with the diagonal (the paper's sums read literally)
    _, with_diag = affinity_terms(P, a, valid, include_diagonal=True)
    row0 = -(log(1.5 / 2) + log(1.5 / 1.7) + log(0.8))
    row1 = -(log(1.3 / 2) + log(1.3 / 1.7) + log(0.6))
    row2 = -(log(0.7) + log(0.7 / 1.1) + log(0.8))
    assert with_diag.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)


def official_global_sum(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The official global term before its mean over rows, written from its definition:
    zero denominators replaced by 1, each ratio r entering as BCE(r, 1) = -max(log r, -100)."""
    vt = a * (1 - torch.eye(a.shape[-1]))
    parts = [(p * vt).sum(-1) / vt.sum(-1).masked_fill(vt.sum(-1) == 0, 1),
             (p * vt).sum(-1) / p.sum(-1),
             ((1 - p) * (1 - a)).sum(-1) / (1 - a).sum(-1).masked_fill((1 - a).sum(-1) == 0, 1)]
    return sum(F.binary_cross_entropy(r, torch.ones_like(r), reduction="sum") for r in parts)


def test_affinity_loss_lone_position_official_constant_same_gradient():
    """No ignored position: ours = the official term less 200 per lone row (its clamp's
    constant), with the same gradient."""
    mask = torch.tensor([[[0, 0, 1], [2, 0, 2]]])  # class 1 alone at position 2
    a, valid = ideal_affinity(mask, (2, 3), 255)
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 6, requires_grad=True)
    ours = affinity_terms(torch.sigmoid(logits), a, valid)[1] * 6
    theirs = official_global_sum(torch.sigmoid(logits), a)
    assert theirs.item() - ours.item() == pytest.approx(200.0, rel=1e-5)
    g_ours, = torch.autograd.grad(ours, logits)
    g_theirs, = torch.autograd.grad(theirs, logits)
    assert torch.allclose(g_ours, g_theirs, atol=1e-6)


# ---- SPNet and DSRL ------------------------------------------------------------------------

def test_strip_pooling_convolutions_have_no_bias():
    spm = StripPoolingModule(16)
    assert spm.conv_h[0].bias is None and spm.conv_v[0].bias is None
    assert spm.fuse.bias is not None
    # 3-tap convs without bias + BN on both strips, 1x1 fuse with bias
    assert n_params(spm) == 2 * (3 * 16 * 16 + 2 * 16) + 16 * 16 + 16


def test_dsrl_deconvolution_is_bilinear_except_on_the_border():
    from segtrain.models.dsrl import SSSRUpsampler

    x = torch.rand(1, 2, 5, 6) + 0.5
    with torch.no_grad():
        y = SSSRUpsampler(2, 2)(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6)
    # outermost rows and columns: zero padding instead of the repeated edge
    assert torch.allclose(y[..., 0, 1:-1], 0.75 * ref[..., 0, 1:-1], atol=1e-6)
    assert torch.allclose(y[..., 1:-1, -1], 0.75 * ref[..., 1:-1, -1], atol=1e-6)
    assert torch.allclose(y[..., 0, 0], 0.5625 * x[..., 0, 0], atol=1e-6)
