"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1).

Dilated for dense prediction as in DeepLab (Chen et al., TPAMI 2017, Sec. 3.1): the strides
of the last stages are replaced by dilation to reach output stride 8 or 16, with optional
multi-grid rates in the last stage (DeepLab v3, Sec. 3.2). state_dict keys are identical to
torchvision's ``resnet*`` checkpoints (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``fc``), so ImageNet weights load with ``strict=True``.

A block may carry a ``gate``: a module mapping the output of its last 3x3 convolution to
multiplicative weights, applied before the 1x1 expansion (Bottleneck) or the residual sum
(BasicBlock). SPNet puts its strip pooling module there (Hou et al., CVPR 2020, Sec. 3.4);
the gate's parameters sit under ``<block>.gate.*``, so torchvision keys are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.models.backbones.pretrained import load_pretrained, widen_input_conv

TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet152": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, stage_dilation: int | None = None) -> None:
        super().__init__()
        # in the first block of a dilated stage conv1 takes the place of the removed stride
        # (previous dilation) and conv2 already sees the stage's dilation, which makes the
        # network the exact dilated equivalent of the strided one
        d2 = stage_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=d2, dilation=d2, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.gate: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.gate is not None:
            out = out * self.gate(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with the stride on the 3x3 (torchvision's "v1.5")."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, stage_dilation: int | None = None) -> None:
        super().__init__()
        del stage_dilation  # the 3x3 is the strided conv: one dilation serves the block
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.gate: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.gate is not None:
            out = out * self.gate(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with an ImageNet classifier (for checkpoint compatibility) and dense features.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
        output_stride: 8, 16 or 32; strides of the last stages become dilation.
        multi_grid: dilation multipliers for the blocks of ``layer4`` (DeepLab v3 uses 1, 2, 4).
        num_classes: size of the ImageNet classifier ``fc``.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 output_stride: int = 32, multi_grid: Sequence[int] | None = None,
                 num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        dilate3 = output_stride == 8
        dilate4 = output_stride in (8, 16)
        self.output_stride = output_stride
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate3)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate4,
                                       multi_grid=multi_grid)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        e = block.expansion
        self.feature_channels = {"c2": 64 * e, "c3": 128 * e, "c4": 256 * e, "c5": 512 * e}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False, multi_grid: Sequence[int] | None = None) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        grid = list(multi_grid) if multi_grid else [1] * blocks
        if len(grid) != blocks:
            raise ValueError(f"multi_grid {grid} must have one rate per block ({blocks})")
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # torchvision keeps the previous dilation in the first block of a dilated stage;
        # with multi-grid every block uses (stage rate x grid[i]) as in DeepLab v3.
        first = self.dilation * grid[0] if multi_grid else previous_dilation
        blocks_ = [block(self.inplanes, planes, stride, first, downsample,
                         stage_dilation=self.dilation * grid[0])]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            blocks_.append(block(self.inplanes, planes, dilation=self.dilation * grid[i]))
        return nn.Sequential(*blocks_)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, as torchvision's model computes them."""
        c5 = self.forward_features(x)["c5"]
        return self.fc(torch.flatten(self.avgpool(c5), 1))

    def drop_classifier(self) -> ResNet:
        """Remove ``fc`` once pretrained weights are in, so no parameter goes unused."""
        self.fc = nn.Identity()
        return self


_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def resnet(depth: int, output_stride: int = 32, multi_grid: Sequence[int] | None = None,
           pretrained: str | None = None, in_channels: int = 3) -> ResNet:
    """Build ResNet-``depth``; ``pretrained`` is a path, a URL or ``"imagenet"``."""
    name = f"resnet{depth}"
    if name not in _SPECS:
        raise ValueError(f"unknown ResNet depth {depth}; choose from 18, 34, 50, 101, 152")
    block, layers = _SPECS[name]
    model = ResNet(block, layers, output_stride, multi_grid)
    if pretrained == "imagenet":
        pretrained = TORCHVISION_URLS[name]
    load_pretrained(model, pretrained)
    if in_channels != 3:
        model.conv1 = widen_input_conv(model.conv1, in_channels)
    return model


def resnet18(**kw) -> ResNet:
    return resnet(18, **kw)


def resnet34(**kw) -> ResNet:
    return resnet(34, **kw)


def resnet50(**kw) -> ResNet:
    return resnet(50, **kw)


def resnet101(**kw) -> ResNet:
    return resnet(101, **kw)
