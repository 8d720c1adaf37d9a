"""Pyramid Pooling Module of PSPNet.

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, Sec. 3.3 and Fig. 3(c): the last
backbone feature map is average-pooled to bins of size 1x1, 2x2, 3x3 and 6x6; each level
passes a 1x1 convolution reducing the channels to 1/N of the input (N = 4 levels), is
upsampled bilinearly to the input size and concatenated with the input. Layout as the
authors' reference implementation (hszhao/semseg ``PPM``): adaptive average pooling,
bias-free 1x1 conv, BatchNorm, ReLU, and upsampling with aligned corners (the Caffe
``Interp`` layer of the original release).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.modules.conv import ConvBNReLU


class PyramidPooling(nn.Module):
    """Pool to each bin size, reduce, upsample, concatenate with the input.

    Args:
        in_channels: channels of the input feature map.
        bins: output sizes of the adaptive average pools, e.g. ``(1, 2, 3, 6)``.
        reduction_channels: channels of each level after its 1x1 conv (``in // len(bins)``
            in the paper).
    """

    def __init__(self, in_channels: int, bins: Sequence[int], reduction_channels: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_channels, reduction_channels, 1))
            for b in bins
        )
        self.out_channels = in_channels + len(bins) * reduction_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x]
        for stage in self.stages:
            outs.append(F.interpolate(stage(x), size, mode="bilinear", align_corners=True))
        return torch.cat(outs, dim=1)
