"""Context Prior Layer of CPNet (Yu, Wang, Gao, Yu, Shen and Sang, "Context Prior for Scene
Segmentation", CVPR 2020, sections "Context Prior Layer" and "Aggregation Module").

- ``AggregationModule`` ("Aggregation Module" and its figure): a 3x3 ConvBNReLU reduces the
  backbone features to ``prior_channels``; two branches of fully separable (depthwise,
  spatially factorised) convolutions, k x 1 then 1 x k, and 1 x k then k x 1, are summed,
  then BN and ReLU (k = 11, the official config's ``am_kernel_size``). As in the official
  code (yu-changqian/ContextPrior ``decode_head/cp_head.py``) the four depthwise
  convolutions have biases and no normalisation of their own.
- ``ContextPriorLayer`` ("Context Prior Layer" and its figure): a 1x1 convolution (+ BN) to
  N = h x w channels and a sigmoid give, at every one of the N positions, its prior towards
  all N positions: the prior map P (B x N x N). Intra-class context ``Y = P X~`` and inter-
  class context ``Y- = (1 - P) X~`` (X~ the aggregated features reshaped to N x C); both are
  divided by N as the official code does (the paper leaves the scale unstated) and pass a
  1x1 ConvBNReLU (official ``intra_conv`` / ``inter_conv``). The output is the concatenation
  ``[X, Y, Y-]`` ("F = Concat(X, Y, Y-)").

N is fixed by ``prior_size`` (h, w): the 1x1 convolution has N output channels. The paper
(and the official code, which asserts it) feeds a feature map of exactly that size, i.e.
prior_size = crop / output stride. A feature map of another size (evaluation on whole
images, another scale) is resized to ``prior_size`` -- adaptive average pooling when it
shrinks, bilinear interpolation otherwise -- and the two contexts are resized back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.modules.conv import ConvBNReLU


def _depthwise(channels: int, kernel_size: tuple[int, int]) -> nn.Conv2d:
    padding = (kernel_size[0] // 2, kernel_size[1] // 2)
    return nn.Conv2d(channels, channels, kernel_size, padding=padding, groups=channels)


class AggregationModule(nn.Module):
    """3x3 reduction, then (k x 1 -> 1 x k) + (1 x k -> k x 1) depthwise, BN, ReLU.

    Args:
        in_channels: backbone channels (2048 for ResNet-50/101).
        out_channels: ``prior_channels`` (512).
        kernel_size: k of the separable convolutions (11).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"the aggregation kernel size must be odd, got {kernel_size}")
        k = kernel_size
        self.reduce = ConvBNReLU(in_channels, out_channels, 3)
        self.branch_a = nn.Sequential(_depthwise(out_channels, (k, 1)),
                                      _depthwise(out_channels, (1, k)))
        self.branch_b = nn.Sequential(_depthwise(out_channels, (1, k)),
                                      _depthwise(out_channels, (k, 1)))
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        return F.relu(self.bn(self.branch_a(x) + self.branch_b(x)))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, tuple(size))
    return F.interpolate(x, tuple(size), mode="bilinear", align_corners=False)


class ContextPriorLayer(nn.Module):
    """Aggregation -> prior map P -> ``[x, P X~ / N, (1 - P) X~ / N]``; also returns P.

    Args:
        in_channels: channels of the input feature map X.
        prior_channels: channels of X~ and of each context (512).
        prior_size: (h, w) of the grid the prior is computed on; N = h * w.
        kernel_size: k of the aggregation module (11).
    """

    def __init__(self, in_channels: int, prior_channels: int, prior_size: Sequence[int],
                 kernel_size: int) -> None:
        super().__init__()
        size = tuple(int(s) for s in prior_size)
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"model.prior_size must be [height, width] of the prior grid "
                              f"(crop / output stride), got {list(prior_size)}")
        self.prior_size = size
        self.num_positions = size[0] * size[1]
        self.aggregation = AggregationModule(in_channels, prior_channels, kernel_size)
        self.prior_conv = nn.Sequential(
            nn.Conv2d(prior_channels, self.num_positions, 1, bias=False),
            nn.BatchNorm2d(self.num_positions))
        self.intra_conv = ConvBNReLU(prior_channels, prior_channels, 1)
        self.inter_conv = ConvBNReLU(prior_channels, prior_channels, 1)
        self.out_channels = in_channels + 2 * prior_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[-2:]
        value = self.aggregation(_resize(x, self.prior_size))  # X~: B x C1 x h x w
        b, c, h, w = value.shape
        # row i of P: the prior of position i towards every position j
        prior = torch.sigmoid(self.prior_conv(value)).flatten(2).transpose(1, 2)  # B x N x N
        flat = value.flatten(2).transpose(1, 2)  # B x N x C1
        intra = torch.bmm(prior, flat) / self.num_positions
        inter = torch.bmm(1.0 - prior, flat) / self.num_positions
        intra = self.intra_conv(intra.transpose(1, 2).reshape(b, c, h, w))
        inter = self.inter_conv(inter.transpose(1, 2).reshape(b, c, h, w))
        if (h, w) != tuple(size):
            intra = F.interpolate(intra, size, mode="bilinear", align_corners=False)
            inter = F.interpolate(inter, size, mode="bilinear", align_corners=False)
        return torch.cat([x, intra, inter], dim=1), prior
