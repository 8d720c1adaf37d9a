"""Strip pooling (Hou, Zhang, Cheng and Feng, "Strip Pooling: Rethinking Spatial Pooling for
Scene Parsing", CVPR 2020).

- ``strip_pool``: Eq. (1)-(2), average pooling over a 1xW strip (one value per row,
  ``y^h``) and over an Hx1 strip (one value per column, ``y^v``).
- ``StripPoolingModule`` (SPM, Sec. 3.2 and Fig. 2): each strip passes a 1-D convolution of
  kernel 3 along its length, both are expanded back to HxW by broadcasting and fused by a
  sum (Eq. 3, ``y_{c,i,j} = y^h_{c,i} + y^v_{c,j}``); a 1x1 convolution and a sigmoid give
  the gate that multiplies the input (Eq. 4, ``z = Scale(x, sigma(f(y)))``). As in the
  authors' code (houqb/SPNet ``models/resnet.py`` ``SPBlock``) each 1-D convolution has
  no bias and is followed by a BatchNorm, a ReLU follows the fusion, and the 1x1
  convolution f has a bias. The module returns the gate; the caller multiplies (a ResNet
  block's ``gate``, see ``backbones/resnet.py``).
- ``MixedPoolingModule`` (MPM, Sec. 3.3 and Fig. 3): both halves start from a 1x1 reduction
  to 1/4 of the channels. Short-range half (Fig. 3a): a lightweight pyramid pooling, the sum
  of a 3x3 convolution and two average poolings to ``pool_sizes`` bins (20 and 12 in the
  authors' code) each followed by a 3x3 convolution and upsampled bilinearly. Long-range
  half (Fig. 3b): horizontal and vertical strip pooling, 1x3 / 3x1 convolutions, expansion
  and sum. Each half passes a ReLU and a 3x3 convolution; the halves are concatenated, a
  1x1 convolution restores the input channels and the result is added to the input
  (residual) before a ReLU. BatchNorm placement follows the authors' ``StripPooling``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.modules.conv import ConvBNReLU


def strip_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1)-(2): ``(y^h, y^v)``, the means over each row (N, C, H, 1) and each column
    (N, C, 1, W)."""
    return x.mean(dim=3, keepdim=True), x.mean(dim=2, keepdim=True)


def _conv_bn(in_channels: int, out_channels: int,
             kernel_size: tuple[int, int]) -> nn.Sequential:
    padding = (kernel_size[0] // 2, kernel_size[1] // 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding,
                                   bias=False),
                         nn.BatchNorm2d(out_channels))


class StripPoolingModule(nn.Module):
    """SPM: returns ``sigmoid(f(y))`` (N, C, H, W), the weights that multiply the input.

    Args:
        channels: input (= output) channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_h = _conv_bn(channels, channels, (3, 1))  # along H, on y^h (no bias)
        self.conv_v = _conv_bn(channels, channels, (1, 3))  # along W, on y^v (no bias)
        self.fuse = nn.Conv2d(channels, channels, 1)  # f in Eq. (4)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (3) before the ReLU: convolved strips broadcast to HxW and summed."""
        y_h, y_v = strip_pool(x)
        return self.conv_h(y_h) + self.conv_v(y_v)  # (N,C,H,1) + (N,C,1,W) -> (N,C,H,W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fuse(F.relu(self.expand(x))))


class MixedPoolingModule(nn.Module):
    """MPM: short-range pyramid pooling + long-range strip pooling, residual.

    Args:
        channels: input (= output) channels (1024 in SPNet's head).
        pool_sizes: the two pyramid bins of the short-range half (20, 12).
    """

    def __init__(self, channels: int, pool_sizes: Sequence[int]) -> None:
        super().__init__()
        if len(pool_sizes) != 2:
            raise ValueError(f"the MPM has two pyramid poolings, got pool_sizes={pool_sizes}")
        inner = channels // 4
        self.pool_sizes = tuple(int(s) for s in pool_sizes)
        self.reduce_short = ConvBNReLU(channels, inner, 1)
        self.reduce_long = ConvBNReLU(channels, inner, 1)
        self.short_conv = _conv_bn(inner, inner, (3, 3))  # the 3x3 path at full resolution
        self.short_pools = nn.ModuleList(_conv_bn(inner, inner, (3, 3)) for _ in pool_sizes)
        self.long_h = _conv_bn(inner, inner, (3, 1))  # on the (H, 1) column of row means
        self.long_v = _conv_bn(inner, inner, (1, 3))  # on the (1, W) row of column means
        self.short_out = ConvBNReLU(inner, inner, 3)
        self.long_out = ConvBNReLU(inner, inner, 3)
        self.project = _conv_bn(2 * inner, channels, (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        short, long = self.reduce_short(x), self.reduce_long(x)
        s = self.short_conv(short)
        for bins, conv in zip(self.pool_sizes, self.short_pools):
            pooled = conv(F.adaptive_avg_pool2d(short, bins))
            s = s + F.interpolate(pooled, size, mode="bilinear", align_corners=True)
        y_h, y_v = strip_pool(long)
        lng = self.long_h(y_h) + self.long_v(y_v)  # expansion by broadcasting
        s, lng = self.short_out(F.relu(s)), self.long_out(F.relu(lng))
        return F.relu(x + self.project(torch.cat([s, lng], dim=1)))
