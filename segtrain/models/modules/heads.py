"""Fully convolutional classifier heads.

``FCNHead`` is the "3x3 conv + BN + ReLU + dropout + 1x1 classifier" head that PSPNet
(Zhao et al., CVPR 2017, Sec. 3.3 and 4.2, authors' hszhao/semseg ``cls``/``aux``) puts
after the pyramid pooling module (512 channels) and as the auxiliary classifier on
ResNet's stage 4, ``res4b22`` / ``layer3`` (256 channels); dropout 0.1 in both.
"""

from __future__ import annotations

from torch import nn

from segtrain.models.modules.conv import ConvBNReLU


class FCNHead(nn.Sequential):
    """3x3 ConvBNReLU to ``mid_channels`` -> Dropout2d -> 1x1 conv to ``num_classes``.

    Args:
        in_channels: input channels.
        mid_channels: channels of the 3x3 convolution.
        num_classes: output channels (logits).
        dropout: Dropout2d probability before the classifier.
    """

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int,
                 dropout: float) -> None:
        super().__init__(
            ConvBNReLU(in_channels, mid_channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(mid_channels, num_classes, 1),
        )
