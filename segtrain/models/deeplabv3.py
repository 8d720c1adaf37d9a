"""DeepLab v3 and DeepLab v3+.

DeepLab v3 (Chen, Papandreou, Schroff and Adam, "Rethinking Atrous Convolution for Semantic
Image Segmentation", arXiv 1706.05587): a ResNet whose last stage is atrous with
multi-grid unit rates (1, 2, 4) (Sec. 3.2), ASPP with rates (6, 12, 18) at output stride 16
and image-level features, all with BN (Sec. 3.3, ``modules.aspp``), a 1x1 classifier,
bilinear upsampling. Trained at output stride 16 and evaluated at 8 (Sec. 4.2, inference
strategy): ``set_output_stride`` re-dilates the backbone in place and doubles the ASPP
rates, with the same parameters.

DeepLab v3+ (Chen, Zhu, Papandreou, Schroff and Adam, "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation", ECCV 2018, Sec. 3.1, Fig. 2 and
Table 1-2): the encoder's features are upsampled 4x and concatenated with the stride-4
low-level features reduced to 48 channels by a 1x1 conv; two 3x3 convs (256) refine them,
then the 1x1 classifier and a 4x upsampling. With ``separable=True`` ASPP and decoder use
depthwise separable convs (Sec. 3.2), as the Xception-65 model does.

MobileNetV2 (Sandler et al., CVPR 2018, Sec. 6.3, Table 7): ``backbone="mobilenetv2"``
with ``atrous_rates=()`` is "MNet V2*" without ASPP (1x1 branch + image pooling on the
320-channel second-last feature map): 2,113,557 parameters for 21 classes, the table's
2.11M; with rates (6, 12, 18) it is the table's 4.52M.

Upsampling uses aligned corners, as the official tensorflow/models implementation does
(``resize_bilinear(..., align_corners=True)``); that code also puts dropout (keep 0.9)
after the ASPP projection (``aspp_dropout``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.backbones.build import build_backbone, set_backbone_output_stride
from segtrain.models.base import SegmentationModel
from segtrain.models.modules.aspp import ASPP
from segtrain.models.modules.conv import ConvBNReLU, SeparableConv2d
from segtrain.models.param_groups import ParamMults, backbone_head_groups

ASPP_CHANNELS = 256  # every ASPP branch and the projection (Sec. 3.3)


def _scaled_rates(rates_at_16: Sequence[int], output_stride: int) -> list[int]:
    """Atrous rates at ``output_stride`` from the rates given at output stride 16."""
    rates = [r * 16 / output_stride for r in rates_at_16]
    if any(r != int(r) or r < 1 for r in rates):
        raise ValueError(f"rates {list(rates_at_16)} do not scale to output stride "
                         f"{output_stride}")
    return [int(r) for r in rates]


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resizing with aligned corners, as the official DeepLab code (and HANet's)."""
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


def plus_decoder(low_level_in: int, low_level_channels: int, decoder_channels: int,
                 separable: bool) -> tuple[nn.Module, nn.Sequential]:
    """DeepLab v3+'s decoder parts (Sec. 3.1): the 1x1 reduction of the stride-4 features
    (``reduce``) and the two 3x3 convs on [upsampled ASPP, reduced] (``decoder``)."""
    reduce = ConvBNReLU(low_level_in, low_level_channels, 1)
    in_ch = ASPP_CHANNELS + low_level_channels
    if separable:
        return reduce, nn.Sequential(SeparableConv2d(in_ch, decoder_channels),
                                     SeparableConv2d(decoder_channels, decoder_channels))
    return reduce, nn.Sequential(ConvBNReLU(in_ch, decoder_channels, 3),
                                 ConvBNReLU(decoder_channels, decoder_channels, 3))


class AtrousEncoder(SegmentationModel):
    """Shared part of v3 and v3+: atrous backbone and ASPP, switchable output stride.

    Args:
        backbone: backbone name for ``build_backbone``.
        output_stride: 8, 16 or 32.
        multi_grid: unit rates of the backbone's last stage or ``None``.
        atrous_rates: ASPP rates at output stride 16.
        aspp_dropout: dropout after the ASPP projection.
        separable: depthwise separable ASPP branches.
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels.
        contract_dilation: ResNets: ``False`` dilates the first block of a dilated stage like
            the others (HANet's reference), kept by ``set_output_stride``.

    The subclasses' ``freeze_bn`` keeps every BatchNorm's statistics and affine weights
    fixed, as DeepLab v3's second stage trains (Sec. 4.1: "we then freeze batch
    normalization parameters, employ output stride = 8, and train on ... trainval").
    """

    # "out_lowres": the logits before the final upsampling, for loss.label_stride
    TRAIN_KEYS = frozenset({"out", "out_lowres"})
    CAN_SET_OUTPUT_STRIDE = True

    def __init__(self, backbone: str, output_stride: int, multi_grid: Sequence[int] | None,
                 atrous_rates: Sequence[int], aspp_dropout: float, separable: bool,
                 pretrained: str | None, in_channels: int, contract_dilation: bool = True) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.multi_grid = tuple(multi_grid) if multi_grid else None
        self.in_channels = in_channels
        self.rates_at_16 = tuple(atrous_rates)
        self.backbone = build_backbone(backbone, output_stride, pretrained, self.multi_grid,
                                       in_channels, contract_dilation)
        self.aspp = ASPP(self.backbone.feature_channels["c5"], ASPP_CHANNELS,
                         _scaled_rates(atrous_rates, output_stride), separable, aspp_dropout)

    def set_output_stride(self, output_stride: int) -> None:
        """Re-dilate the backbone and rescale the ASPP rates in place (no new parameters)."""
        rates = _scaled_rates(self.rates_at_16, output_stride)
        set_backbone_output_stride(self.backbone, self.backbone_name, output_stride,
                                   self.multi_grid, self.in_channels)
        self.aspp.set_rates(rates)

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    head_lr_mult: float = 1.0
    head_bias_lr_mult: float = 1.0

    def _new_layers(self) -> list[nn.Module]:
        raise NotImplementedError  # each network names its new layers

    def param_groups(self, mults: ParamMults | None = None) -> list[dict]:
        """Backbone at 1x; ASPP, decoder and classifier at ``head_lr_mult`` (biases at
        ``head_bias_lr_mult``); the official DeepLab code trains every layer at 1x."""
        return backbone_head_groups(self.backbone, self._new_layers(), self.head_lr_mult,
                                    self.head_bias_lr_mult, mults)


class DeepLabV3(AtrousEncoder):
    """Atrous backbone -> ASPP -> 1x1 classifier -> bilinear upsampling.

    Args:
        num_classes: number of classes.
        backbone: backbone name for ``build_backbone`` (``resnet101``, ``mobilenetv2``, ...).
        output_stride: 16 (train) or 8 (eval) in the paper; ``set_output_stride`` switches.
        multi_grid: unit rates of the last stage, ``(1, 2, 4)`` in the paper, or ``None``.
        atrous_rates: ASPP rates *at output stride 16* (``(6, 12, 18)``); scaled by
            16 / output_stride. Empty: only the 1x1 branch and image pooling.
        aspp_dropout: dropout after the ASPP projection (0.1 in the official code).
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels (e.g. 4 for RGB-D).
        freeze_bn: fixed BatchNorm (DeepLab v3 Sec. 4.1, second stage;
            ``SegmentationModel.set_freeze_bn``).
    """

    def __init__(self, num_classes: int, backbone: str, output_stride: int,
                 multi_grid: Sequence[int] | None, atrous_rates: Sequence[int],
                 aspp_dropout: float, pretrained: str | None, in_channels: int = 3,
                 head_lr_mult: float = 1.0, head_bias_lr_mult: float = 1.0,
                 freeze_bn: bool = False) -> None:
        super().__init__(backbone, output_stride, multi_grid, atrous_rates, aspp_dropout,
                         False, pretrained, in_channels)
        self.head_lr_mult, self.head_bias_lr_mult = head_lr_mult, head_bias_lr_mult
        self.classifier = nn.Conv2d(ASPP_CHANNELS, num_classes, 1)
        self.set_freeze_bn(freeze_bn)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        c5 = self.backbone.forward_features(image)["c5"]
        logits = self.classifier(self.aspp(c5))  # at the output stride (loss.label_stride)
        out = upsample(logits, image.shape[-2:])
        return {"out": out, "out_lowres": logits} if self.training else {"out": out}

    def _new_layers(self) -> list[nn.Module]:
        return [self.aspp, self.classifier]


class DeepLabV3Plus(AtrousEncoder):
    """DeepLab v3 encoder + decoder on the stride-4 low-level features ``c2``.

    Args:
        num_classes: number of classes.
        backbone: backbone name (``xception65``, ``resnet101``, ``mobilenetv2``, ...).
        output_stride: 16 (train) or 8 (eval) in the paper.
        multi_grid: unit rates of the last stage or ``None``.
        atrous_rates: ASPP rates at output stride 16 (``(6, 12, 18)``).
        aspp_dropout: dropout after the ASPP projection.
        separable: depthwise separable convs in ASPP and decoder.
        low_level_channels: channels of the reduced low-level features (48, Table 1).
        decoder_channels: channels of the two 3x3 decoder convs (256, Table 2).
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels.
        freeze_bn: fixed BatchNorm (DeepLab v3 Sec. 4.1, second stage;
            ``SegmentationModel.set_freeze_bn``).
    """

    def __init__(self, num_classes: int, backbone: str, output_stride: int,
                 multi_grid: Sequence[int] | None, atrous_rates: Sequence[int],
                 aspp_dropout: float, separable: bool, low_level_channels: int,
                 decoder_channels: int, pretrained: str | None, in_channels: int = 3,
                 head_lr_mult: float = 1.0, head_bias_lr_mult: float = 1.0,
                 freeze_bn: bool = False) -> None:
        super().__init__(backbone, output_stride, multi_grid, atrous_rates, aspp_dropout,
                         separable, pretrained, in_channels)
        self.head_lr_mult, self.head_bias_lr_mult = head_lr_mult, head_bias_lr_mult
        self.reduce, self.decoder = plus_decoder(self.backbone.feature_channels["c2"],
                                                 low_level_channels, decoder_channels, separable)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.set_freeze_bn(freeze_bn)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone.forward_features(image)
        low = self.reduce(feats["c2"])
        x = upsample(self.aspp(feats["c5"]), low.shape[-2:])
        x = self.decoder(torch.cat([x, low], dim=1))
        logits = self.classifier(x)  # at stride 4, the decoder's (loss.label_stride=4)
        out = upsample(logits, image.shape[-2:])
        return {"out": out, "out_lowres": logits} if self.training else {"out": out}

    def _new_layers(self) -> list[nn.Module]:
        return [self.aspp, self.reduce, self.decoder, self.classifier]
