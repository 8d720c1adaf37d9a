"""VGG-16 (Simonyan & Zisserman, ICLR 2015, Table 1 column D) and VGG-16-BN.

For dense prediction the pools after the output stride keep their resolution (3x3, stride 1,
padding 1) and the following convolutions are dilated, as DeepLab v1 does with pool4/pool5
and conv5 (Chen et al., ICLR 2015, Sec. 3.1). ``pool_kernel=3`` gives the strided pools of
the released DeepLab-LargeFOV prototxt too (3x3, stride 2, padding 1, Caffe's ceil rounding)
instead of VGG's 2x2 stride 2. state_dict keys are identical to torchvision's
``vgg16``/``vgg16_bn`` (``features.N``, ``classifier.{0,3,6}``), so ImageNet weights load
with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.backbones.pretrained import load_pretrained

TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg16_bn": "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
}

# Configuration D: channels per conv, "M" = max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-16 with its ImageNet classifier and dense features.

    Args:
        batch_norm: VGG-16-BN when true.
        output_stride: 8, 16 or 32. At 8, pool4 and pool5 keep resolution and conv5 is
            dilated by 2; at 16, only pool5 does.
        pool_kernel: 2 (VGG: 2x2 stride-2 pools) or 3 (DeepLab: 3x3 stride-2 pools with
            padding 1); no parameter changes, so ImageNet weights load either way.
        width: every layer's channels times this (1: VGG-16; less for a small stand-in,
            ``segtrain.reproduce scale=tiny``; ImageNet weights need 1).
    """

    def __init__(self, batch_norm: bool = False, output_stride: int = 32,
                 num_classes: int = 1000, pool_kernel: int = 2, width: float = 1.0) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if pool_kernel not in (2, 3):
            raise ValueError(f"pool_kernel must be 2 (VGG) or 3 (DeepLab), got {pool_kernel}")
        self.output_stride = output_stride
        self.batch_norm = batch_norm
        self.width = width
        layers: list[nn.Module] = []
        in_ch, stride, dilation, pool_index = 3, 1, 1, 0
        self.stage_ends: dict[str, int] = {}  # feature key -> index after its pool
        for v in VGG16_CFG:
            if v == "M":
                pool_index += 1
                if stride >= output_stride:
                    # keep resolution; later convolutions see a doubled dilation
                    layers.append(nn.MaxPool2d(3, 1, 1))
                    dilation *= 2
                else:
                    layers.append(nn.MaxPool2d(3, 2, 1, ceil_mode=True) if pool_kernel == 3
                                  else nn.MaxPool2d(2, 2, ceil_mode=False))
                    stride *= 2
                if pool_index >= 2:
                    self.stage_ends[f"c{pool_index}"] = len(layers)
            else:
                v = max(1, round(v * width))
                # dilation applies to the convolutions after a resolution-keeping pool
                layers.append(nn.Conv2d(in_ch, v, 3, padding=dilation, dilation=dilation))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = max(1, round(4096 * width))
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        self.feature_channels = {k: max(1, round(c * width)) for k, c in
                                 {"c2": 128, "c3": 256, "c4": 512, "c5": 512}.items()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs after pool2..pool5 under the keys c2..c5."""
        out: dict[str, torch.Tensor] = {}
        ends = {end: key for key, end in self.stage_ends.items()}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i + 1 in ends:
                out[ends[i + 1]] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, as torchvision's model computes them."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def drop_classifier(self) -> VGG:
        self.classifier = nn.Identity()
        return self


def vgg16(output_stride: int = 32, pretrained: str | None = None,
          batch_norm: bool = False, pool_kernel: int = 2, width: float = 1.0) -> VGG:
    """VGG-16 (or VGG-16-BN); ``pretrained`` is a path, a URL or ``"imagenet"``."""
    if pretrained and width != 1.0:
        raise ValueError(f"ImageNet VGG-16 weights need width 1, got width {width}")
    model = VGG(batch_norm=batch_norm, output_stride=output_stride, pool_kernel=pool_kernel,
                width=width)
    if pretrained == "imagenet":
        pretrained = TORCHVISION_URLS["vgg16_bn" if batch_norm else "vgg16"]
    return load_pretrained(model, pretrained)


def vgg16_bn(output_stride: int = 32, pretrained: str | None = None) -> VGG:
    return vgg16(output_stride, pretrained, batch_norm=True)
