"""Atrous Spatial Pyramid Pooling of DeepLab v3 and v3+.

DeepLab v3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
arXiv 1706.05587, Sec. 3.3, Fig. 5): "(a) one 1x1 convolution and three 3x3 convolutions
with rates = (6, 12, 18) when output stride = 16 (all with 256 filters and batch
normalization), and (b) the image-level features" (global average pooling -> 1x1 conv 256
+ BN -> bilinear upsampling); the branches are concatenated and "pass through another 1x1
convolution (also with 256 filters and batch normalization)". The rates are doubled at
output stride 8. DeepLab v3+ (Chen et al., ECCV 2018, Sec. 3.1) makes the atrous branches
depthwise separable (``separable=True``). The dropout after the projection is the official
tensorflow/models implementation's (keep_prob 0.9), not stated in the papers.

An empty ``atrous_rates`` gives the MobileNetV2 variant's head (Sandler et al., CVPR 2018,
Sec. 6.3, Table 7 "MNet V2*" without ASPP): only the 1x1 branch and image pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.models.modules.conv import ConvBNReLU, SeparableConv2d, set_dilation


class ImagePooling(nn.Module):
    """Global average pooling -> 1x1 conv + BN + ReLU, broadcast back to the input size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bilinear upsampling of a 1x1 map is a constant: expand says so exactly
        return self.conv(self.pool(x)).expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """ASPP: 1x1 branch, one 3x3 atrous branch per rate, image pooling, 1x1 projection.

    Args:
        in_channels: channels of the backbone feature map.
        out_channels: channels of every branch and of the projection (256 in the papers).
        atrous_rates: dilation of each 3x3 branch at the current output stride.
        separable: depthwise separable atrous branches (DeepLab v3+).
        dropout: dropout probability after the projection.
    """

    def __init__(self, in_channels: int, out_channels: int, atrous_rates: Sequence[int],
                 separable: bool, dropout: float) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvBNReLU(in_channels, out_channels, 1)]
        for rate in atrous_rates:
            if separable:
                branches.append(SeparableConv2d(in_channels, out_channels, 3, dilation=rate))
            else:
                branches.append(ConvBNReLU(in_channels, out_channels, 3, dilation=rate))
        self.branches = nn.ModuleList(branches)
        self.pooling = ImagePooling(in_channels, out_channels)
        self.project = nn.Sequential(
            ConvBNReLU((len(branches) + 1) * out_channels, out_channels, 1),  # pyramid_channels
            nn.Dropout(dropout),
        )
        self.out_channels = out_channels
        #: channels of ``pyramid``'s output, the projection's input
        self.pyramid_channels = (len(branches) + 1) * out_channels
        self.atrous_rates = tuple(atrous_rates)

    def set_rates(self, atrous_rates: Sequence[int]) -> None:
        """Change the atrous rates in place (same parameters), e.g. at another output stride."""
        if len(atrous_rates) != len(self.atrous_rates):
            raise ValueError(f"need {len(self.atrous_rates)} rates, got {list(atrous_rates)}")
        for branch, rate in zip(self.branches[1:], atrous_rates):
            conv = branch.depthwise if isinstance(branch, SeparableConv2d) else branch[0]
            set_dilation(conv, rate)
        self.atrous_rates = tuple(atrous_rates)

    def pyramid(self, x: torch.Tensor) -> torch.Tensor:
        """The branches and the image pooling, concatenated (before the projection)."""
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pooling(x))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pyramid(x))
