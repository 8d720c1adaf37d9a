"""Small convolution blocks shared by the segmentation heads and backbones.

- ``ConvBNReLU``: convolution (no bias, BatchNorm follows) + BN + ReLU, the unit of every
  DeepLab v3 (Chen et al., arXiv 1706.05587, Sec. 3.3) and PSPNet (Zhao et al., CVPR 2017,
  Sec. 3.3) head.
- ``SeparableConv2d``: depthwise 3x3 + BN (+ ReLU) + pointwise 1x1 + BN (+ ReLU), the
  "atrous separable convolution" of DeepLab v3+ (Chen et al., ECCV 2018, Sec. 3.1 and
  Fig. 3, with the extra BN/ReLU after the depthwise convolution of Sec. 3.2), laid out as
  the official ``split_separable_conv2d`` of tensorflow/models ``research/deeplab``.
- ``set_dilation``: change a convolution's dilation in place (output-stride switching).
"""

from __future__ import annotations

import torch
from torch import nn


def set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    """Give a stride-free odd-kernel ``conv`` a new dilation, padding kept "same"."""
    k = conv.kernel_size[0]
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (k - 1) // 2,) * 2


class ConvBNReLU(nn.Sequential):
    """Conv (bias-free) -> BatchNorm -> ReLU with "same" padding for odd kernels.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size (odd).
        stride: convolution stride.
        dilation: atrous rate.
        groups: convolution groups (``in_channels`` for a depthwise convolution).
        activation: ``nn.ReLU``, or ``nn.ReLU6`` for MobileNetV2.

    Keys ``0`` (conv) and ``1`` (BN) match torchvision's ``Conv2dNormActivation``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, groups: int = 1,
                 activation: type[nn.Module] = nn.ReLU) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            activation(inplace=True),
        )


class SeparableConv2d(nn.Module):
    """Depthwise separable convolution with BatchNorm after each half.

    ``activation=True`` puts a ReLU after both BatchNorms (DeepLab v3+ ASPP/decoder and
    the last Xception exit-flow block); ``activation=False`` leaves both linear, as the
    entry/middle-flow Xception units do, whose ReLU comes *before* each separable conv.

    Args:
        in_channels: input channels (= depthwise channels).
        out_channels: pointwise output channels.
        kernel_size: depthwise kernel size (odd).
        stride: depthwise stride.
        dilation: depthwise atrous rate.
        activation: ReLU after the depthwise BN and after the pointwise BN.
        bn_eps: BatchNorm epsilon (TensorFlow checkpoints use 1e-3).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, activation: bool = True,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding,
                                   dilation, groups=in_channels, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(in_channels, eps=bn_eps)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn_pointwise = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_depthwise(self.depthwise(x))
        if self.activation:
            x = torch.relu(x)
        x = self.bn_pointwise(self.pointwise(x))
        if self.activation:
            x = torch.relu(x)
        return x
