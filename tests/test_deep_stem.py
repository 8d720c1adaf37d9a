"""Deep-stem ResNets (three 3x3 convolutions in the stem: HANet's, SPNet's and CPNet's
backbones) load the three key layouts a deep-stem ImageNet ResNet comes in, each checkpoint
built here by a module in that codebase's naming, and the loaded backbone computes what that
module computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.backbones.build import build_backbone
from segtrain.models.backbones.resnet import BasicBlock, ResNet

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


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
