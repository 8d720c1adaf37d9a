"""DSRL: Dual Super-Resolution Learning on DeepLab v3+.

Wang, Li, Zhu, Tian and Shan, "Dual Super-Resolution Learning for Semantic Segmentation",
CVPR 2020, Sec. 3.2 and Fig. 2. The network sees the image downsampled by ``sr_factor``
(2 in the paper: 512x1024 inputs for 1024x2048 Cityscapes labels) and is supervised at
the original resolution. Three parts:

- SSSR (semantic segmentation super-resolution): the DeepLab v3+ segmentation path
  (``deeplabv3.DeepLabV3Plus``: backbone, ASPP, decoder, classifier, 4x upsampling to the
  low-resolution input) followed by the extra upsampling module of Sec. 3.2, made of
  deconvolutions: one 2x ConvTranspose2d per factor of 2, with BN + ReLU between two of
  them. They act on the class scores, each initialised with the bilinear kernel
  (``fcn.bilinear_kernel``): away from the border it computes bilinear upsampling
  (``align_corners=False``) exactly, on the outermost output rows and columns the zero
  padding stands where interpolation repeats the edge (0.75 x_0 instead of x_0, 0.5625
  x_0 at a corner). So SSSR starts close to the plain network followed by bilinear
  upsampling and learns from there.
- SISR (single image super-resolution, training only): shares the encoder (backbone and
  ASPP) and has its own decoder of the DeepLab v3+ form (its own 48-channel reduction of
  the stride-4 features, two 3x3 convs of ``sr_channels``), ending in the sub-pixel
  convolution of ESPCN (Shi et al., CVPR 2016, Sec. 2.2: a convolution to
  ``C * r^2`` channels and a periodic shuffle, ``nn.PixelShuffle(r)``), ``r = 4 *
  sr_factor`` from the stride-4 features to the full resolution. It reconstructs the
  full-resolution input (in the normalised image space the loss compares it with).
- FA (feature affinity, Sec. 3.2 Eq. 1-2, training only): the loss compares the pairwise
  similarity matrices of an SSSR feature and an SISR feature. We take the SSSR output
  (class scores at full resolution) and the SISR output passed through a feature
  transform, a 1x1 convolution to the SSSR channels (the paper's feature transform module,
  needed when the channel counts differ). Pooling and the similarities live in
  ``losses.dsrl``.

In eval mode (``model.eval()``) only the SSSR path runs: the SISR decoder and the feature
transform are never called, so inference costs exactly the segmentation path: SISR and
FA serve training only and are dropped at inference in the paper (Sec. 3.2), which is how
DSRL improves accuracy without extra inference cost.

Layer4 multi-grid: none by default (``conf/model/dsrl.yaml``: every layer4 block at the
stage's dilation, the first at the previous one, torchvision's layout); the paper does not
say, and the available port hard-codes layer4 dilations 2 / 4 / 8, i.e. DeepLab v3's
multi-grid (1, 2, 4) at output stride 16: ``model.multi_grid=[1,2,4]`` builds that.

Differences from that port and the paper, one per line:

- layer4 multi-grid: none here, (1, 2, 4) in the port (above);
- the SISR decoder's width (``sr_channels``) and the feature transform (a 1x1 conv on the
  reconstructed image) are this implementation's choices; the paper gives neither.

Sizes: the input ``H x W`` is downsampled to ``ceil(H / s) x ceil(W / s)`` by area
interpolation (the mean of each ``s x s`` block when ``s`` divides the size, like
OpenCV's INTER_AREA resize of the images); SSSR and SISR outputs are resized bilinearly to
exactly ``H x W`` (a no-op when ``s`` divides both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.deeplabv3 import ASPP_CHANNELS, DeepLabV3Plus
from segtrain.models.fcn import bilinear_kernel
from segtrain.models.modules.conv import ConvBNReLU


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def _deconv2x(channels: int) -> nn.ConvTranspose2d:
    """2x ConvTranspose2d (kernel 4, stride 2, padding 1): exact output size 2n, starts
    with the bilinear kernel (the padding is the centre crop of FCN's upsampler): bilinear
    upsampling except on the outermost rows and columns, where zero padding enters."""
    up = nn.ConvTranspose2d(channels, channels, 4, 2, 1, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 4))
    return up


class SSSRUpsampler(nn.Sequential):
    """``log2(factor)`` learned 2x deconvolutions on the class scores; BN + ReLU between
    two deconvolutions, none after the last (its output is the logits)."""

    def __init__(self, channels: int, factor: int) -> None:
        layers: list[nn.Module] = []
        for i in range(int(math.log2(factor))):
            if i > 0:
                layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            layers.append(_deconv2x(channels))
        super().__init__(*layers)


class SISRDecoder(nn.Module):
    """DeepLab v3+-shaped decoder + ESPCN sub-pixel convolution to the image.

    Args:
        aspp_channels: channels of the shared ASPP output.
        low_level_in: channels of the shared stride-4 backbone features.
        low_level_channels: channels of this decoder's own low-level reduction (48).
        channels: channels of the two 3x3 convolutions.
        out_channels: image channels to reconstruct.
        upscale: sub-pixel factor from the stride-4 features to the full resolution.
    """

    def __init__(self, aspp_channels: int, low_level_in: int, low_level_channels: int,
                 channels: int, out_channels: int, upscale: int) -> None:
        super().__init__()
        self.reduce = ConvBNReLU(low_level_in, low_level_channels, 1)
        self.fuse = nn.Sequential(ConvBNReLU(aspp_channels + low_level_channels, channels, 3),
                                  ConvBNReLU(channels, channels, 3))
        self.subpixel = nn.Conv2d(channels, out_channels * upscale ** 2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, aspp: torch.Tensor, low_level: torch.Tensor) -> torch.Tensor:
        low = self.reduce(low_level)
        x = F.interpolate(aspp, low.shape[-2:], mode="bilinear", align_corners=True)
        return self.shuffle(self.subpixel(self.fuse(torch.cat([x, low], dim=1))))


class DSRL(DeepLabV3Plus):
    """DeepLab v3+ on a ``sr_factor``-times smaller input + SSSR, SISR and FA features.

    Args:
        num_classes: number of classes.
        backbone: ``resnet101``, ``mobilenetv2``, ``xception65``, ... (``build_backbone``).
        output_stride: 16 (DeepLab v3+ training setting).
        multi_grid: unit rates of the last stage or ``None``.
        atrous_rates: ASPP rates at output stride 16 (``(6, 12, 18)``).
        aspp_dropout: dropout after the ASPP projection.
        separable: depthwise separable ASPP and decoder (the Xception-65 model).
        low_level_channels: reduced low-level channels of both decoders (48).
        decoder_channels: channels of the segmentation decoder's 3x3 convs (256).
        sr_factor: input downsampling and output upsampling factor, a power of 2 (2).
        sr_channels: channels of the SISR decoder's 3x3 convs.
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels (also the channels SISR reconstructs).

    Training mode returns ``{"out", "sr", "fa_seg", "fa_sr"}``; eval mode ``{"out"}``.
    """

    TRAIN_KEYS = frozenset({"out", "sr", "fa_seg", "fa_sr"})

    def __init__(self, num_classes: int, backbone: str, output_stride: int,
                 multi_grid: Sequence[int] | None, atrous_rates: Sequence[int],
                 aspp_dropout: float, separable: bool, low_level_channels: int,
                 decoder_channels: int, sr_factor: int, sr_channels: int,
                 pretrained: str | None, in_channels: int = 3) -> None:
        if not isinstance(sr_factor, int) or sr_factor < 1 or sr_factor & (sr_factor - 1):
            raise ConfigError(f"model.sr_factor must be a power of 2 (1, 2, 4, ...), "
                              f"got {sr_factor!r}")
        if sr_channels < 1:
            raise ConfigError(f"model.sr_channels must be a positive integer, got {sr_channels}")
        super().__init__(num_classes, backbone, output_stride, multi_grid, atrous_rates,
                         aspp_dropout, separable, low_level_channels, decoder_channels,
                         pretrained, in_channels)
        self.sr_factor = sr_factor
        self.sssr = SSSRUpsampler(num_classes, sr_factor)
        self.sisr = SISRDecoder(ASPP_CHANNELS, self.backbone.feature_channels["c2"],
                                low_level_channels, sr_channels, in_channels, 4 * sr_factor)
        # feature transform: SISR output -> SSSR channels for the affinity (FA) loss
        self.feature_transform = nn.Conv2d(in_channels, num_classes, 1)

    def low_resolution(self, image: torch.Tensor) -> torch.Tensor:
        """The network input: ``image`` downsampled by ``sr_factor`` (area interpolation)."""
        if self.sr_factor == 1:
            return image
        h, w = (math.ceil(n / self.sr_factor) for n in image.shape[-2:])
        return F.interpolate(image, (h, w), mode="area")

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        size = image.shape[-2:]
        small = self.low_resolution(image)
        feats = self.backbone.forward_features(small)
        aspp = self.aspp(feats["c5"])
        low = self.reduce(feats["c2"])
        x = F.interpolate(aspp, low.shape[-2:], mode="bilinear", align_corners=True)
        x = self.classifier(self.decoder(torch.cat([x, low], dim=1)))
        x = F.interpolate(x, small.shape[-2:], mode="bilinear", align_corners=True)
        out = _resize(self.sssr(x), size)
        if not self.training:
            return {"out": out}
        sr = _resize(self.sisr(aspp, feats["c2"]), size)
        return {"out": out, "sr": sr, "fa_seg": out, "fa_sr": self.feature_transform(sr)}

    def head_modules(self) -> list[nn.Module]:
        """DeepLab v3+'s new layers, SSSR, SISR and the feature transform."""
        return [self.aspp, self.reduce, self.decoder, self.classifier, self.sssr, self.sisr,
                self.feature_transform]
