"""SegNet and SegNet-Basic (Badrinarayanan, Kendall and Cipolla, "SegNet: A Deep
Convolutional Encoder-Decoder Architecture for Image Segmentation", TPAMI 2017).

SegNet (Sec. 3, Fig. 2-3): the encoder is the 13 convolutional layers of VGG-16 with
BatchNorm, each 2x2 max pooling storing its indices. The decoder mirrors the encoder: each
stage upsamples with the *stored max-pooling indices* (no learned upsampling; Fig. 3) and
convolves with trainable 3x3 filters + BN + ReLU; the last decoder conv (3x3, to the number
of classes) feeds the softmax classifier. Channel layout of the authors' Caffe model
(``segnet_train.prototxt``): 512-512-512 | 512-512-256 | 256-256-128 | 128-64 | 64-K. The
encoder reuses ``vgg16_bn`` so torchvision's ImageNet VGG-16-BN weights load unchanged. With
11 classes (CamVid) encoder + decoder have 29,449,355 parameters, the paper's 29.45M
trainable parameters.

SegNet-Basic (Sec. 4.1, the CamVid ablation net): 4 encoders of 7x7 conv (64 channels) +
BN + ReLU + 2x2 max pooling with indices; 4 decoders of index unpooling + 7x7 conv (64) +
BN, without ReLU; "no biases are used after convolutions and no ReLU non-linearity is
present in the decoder network"; a 1x1 conv classifier (with bias). 1,416,075 parameters
for 11 classes against the 1.425M of the paper's ablation table
(Table 1), 0.6% apart, the paper's figure being rounded and its counting rule unstated.

``input_lrn`` puts the local response normalisation of the reference SegNet-Basic model
(alexgkendall/SegNet-Tutorial ``Models/segnet_basic_train.prototxt``, layer "norm": LRN
across channels, local_size 5, alpha 0.0001, beta 0.75, Caffe's k = 1) on the input; it has
no parameters. The reference feeds raw 0..255 pixels, on which it is a real normalisation;
on mean/std-normalised inputs it is close to the identity (experiment=segnet_basic_camvid
feeds raw pixels as the reference does).

Odd sizes: pooling floors, and unpooling is given the pre-pooling size (``output_size``),
so every level recovers its exact size; inputs smaller than 2^depth are zero-padded.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.vgg import VGG, vgg16_bn
from segtrain.models.base import SegmentationModel

# Decoder conv + BN + ReLU widths per stage, deepest first, as in the reference Caffe model;
# stage 1 then ends with the classifier conv.
SEGNET_DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))


def _pad_to_min(x: torch.Tensor, size: int) -> torch.Tensor:
    pad_h, pad_w = max(0, size - x.shape[2]), max(0, size - x.shape[3])
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, relu: bool,
             bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SegNet(SegmentationModel):
    """SegNet with a VGG-16-BN encoder and an index-unpooling decoder.

    Args:
        num_classes: number of classes.
        pretrained: VGG-16-BN ImageNet checkpoint (path, URL, ``"imagenet"``) or ``None``.
    """

    def __init__(self, num_classes: int, pretrained: str | None) -> None:
        super().__init__()
        self.encoder: VGG = vgg16_bn(output_stride=32, pretrained=pretrained).drop_classifier()
        # encoder stages: the layers between consecutive pools
        self.stages: list[list[int]] = [[]]
        for i, layer in enumerate(self.encoder.features):
            if isinstance(layer, nn.MaxPool2d):
                self.stages.append([])
            else:
                self.stages[-1].append(i)
        self.stages.pop()
        decoder = []
        in_ch = 512
        for widths in SEGNET_DECODER:
            layers = []
            for width in widths:
                layers.append(_conv_bn(in_ch, width, 3, relu=True, bias=True))
                in_ch = width
            decoder.append(nn.Sequential(*layers))
        # conv1_1_D: the 3x3 classifier feeding the softmax, no BN/ReLU
        decoder[-1].append(nn.Conv2d(in_ch, num_classes, 3, padding=1))
        self.decoder = nn.ModuleList(decoder)
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)  # every SegNet decoder conv has a bias (Caffe model)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        x = _pad_to_min(image, 2 ** len(self.stages))
        pooled: list[tuple[torch.Tensor, torch.Size]] = []
        for stage in self.stages:
            for i in stage:
                x = self.encoder.features[i](x)
            size = x.shape[-2:]
            x, indices = F.max_pool2d(x, 2, 2, return_indices=True)
            pooled.append((indices, size))
        for decoder in self.decoder:
            indices, size = pooled.pop()
            x = decoder(F.max_unpool2d(x, indices, 2, 2, output_size=size))
        return {"out": x[:, :, :h, :w]}

    def head_modules(self) -> list[nn.Module]:
        """The decoder (new layers; the encoder is VGG-16-BN's)."""
        return [self.decoder]


class SegNetBasic(SegmentationModel):
    """SegNet-Basic: ``depth`` encoders/decoders of ``channels`` kxk filters.

    Args:
        num_classes: number of classes.
        depth: encoder (= decoder) layers (4 in the paper).
        channels: feature channels of every layer (64 in the paper).
        kernel_size: convolution size (7 in the paper).
        in_channels: input channels.
        input_lrn: ``{size, alpha, beta, k}`` of an ``nn.LocalResponseNorm`` on the input
            (the reference model's "norm" layer), or None.

    Trained from scratch: no head (the contract's default ``head_modules``).
    """

    def __init__(self, num_classes: int, depth: int, channels: int, kernel_size: int,
                 in_channels: int = 3, input_lrn: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.input_norm: nn.Module = nn.Identity()
        if input_lrn is not None:
            if not {"size", "alpha", "beta"} <= set(input_lrn) <= {"size", "alpha", "beta", "k"}:
                raise ConfigError(f"model.input_lrn must be null or have keys size, alpha, "
                                  f"beta (and optionally k), got {dict(input_lrn)}")
            self.input_norm = nn.LocalResponseNorm(
                int(input_lrn["size"]), float(input_lrn["alpha"]), float(input_lrn["beta"]),
                float(input_lrn.get("k", 1.0)))
        self.encoders = nn.ModuleList(
            _conv_bn(in_channels if i == 0 else channels, channels, kernel_size, relu=True,
                     bias=False)
            for i in range(depth)
        )
        self.decoders = nn.ModuleList(
            _conv_bn(channels, channels, kernel_size, relu=False, bias=False)
            for _ in range(depth)
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        x = _pad_to_min(self.input_norm(image), 2 ** len(self.encoders))
        pooled = []
        for encoder in self.encoders:
            x = encoder(x)
            size = x.shape[-2:]
            x, indices = F.max_pool2d(x, 2, 2, return_indices=True)
            pooled.append((indices, size))
        for decoder in self.decoders:
            indices, size = pooled.pop()
            x = decoder(F.max_unpool2d(x, indices, 2, 2, output_size=size))
        return {"out": self.classifier(x)[:, :, :h, :w]}
