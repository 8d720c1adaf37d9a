"""Fully Convolutional Networks: FCN-32s, FCN-16s, FCN-8s.

Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic Segmentation",
CVPR 2015 (Sec. 3.1 convolutionalization, Sec. 3.3 upsampling by backwards-strided
convolution, Sec. 4.2 skip architecture, Fig. 3), with the geometry of the authors'
reference Caffe nets (shelhamer/fcn.berkeleyvision.org ``voc-fcn{32,16,8}s/net.py``):

- VGG-16 (``features`` of ``segtrain.models.backbones.vgg``, torchvision keys) with the
  first convolution padded by 100 and ceil-mode pooling, as in Caffe, so that any input
  size survives the 7x7 ``fc6`` and the upsampled scores cover the whole image;
- ``fc6`` (7x7 conv, 4096) and ``fc7`` (1x1 conv, 4096), ReLU + dropout each; with
  ``pretrained`` their weights are VGG's ``classifier.0``/``classifier.3`` reshaped
  ("convolutionalization", Sec. 3.1);
- 1x1 score layers on fc7, pool4 and pool3, zero-initialised (Sec. 4);
- transposed convolutions (kernel 2s, stride s, no bias) initialised to bilinear
  interpolation, one per class (the reference ``surgery.interp``). The final upsampler is
  fixed; the 2x ones are learned when ``learnable_upsampling`` (Sec. 4.3, "Dense
  Prediction": "Final layer deconvolutional filters are fixed to bilinear interpolation,
  while intermediate upsampling layers are initialized to bilinear upsampling, and then
  learned");
- fusion by cropping and summation with the reference crop offsets, derived from the
  coordinate maps (input coordinate of output index y, Caffe's ``coord_map``):
  pool3 = 8y - 95.5, pool4 = 16y - 91.5, fc7 = 32y + 12.5, so score_pool4 is cropped at 5
  to match 2x(fc7) = 16y - 11.5, score_pool3 at 9 to match 2x(fuse_pool4) = 8y - 23.5,
  and the final scores at 19 (32s), 27 (16s) or 31 (8s) to match the image. The output
  therefore equals the input size for every size.

``skip_scaling`` multiplies pool4 by 0.01 and pool3 by 1e-4 before scoring, as the
reference "at-once" FCN-8s does to train all strides jointly; the paper's staged training
(32s -> 16s -> 8s) does without it. The learning rates follow the paper's Caffe solvers:
one rate for all weights, twice it for biases, no weight decay on biases.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.backbones.vgg import VGG, vgg16
from segtrain.models.base import SegmentationModel

# Crop offsets of the reference nets (see the module docstring for the derivation).
CROP_POOL4 = 5
CROP_POOL3 = 9
CROP_FINAL = {32: 19, 16: 27, 8: 31}


def bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """(C, C, k, k) weight of a per-class bilinear upsampler (Caffe's ``upsample_filt``)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float64)
    filt1d = 1 - (og - center).abs() / factor
    filt = (filt1d[:, None] * filt1d[None, :]).float()
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    weight[range(channels), range(channels)] = filt
    return weight


def bilinear_upsampler(channels: int, factor: int, learnable: bool) -> nn.ConvTranspose2d:
    """ConvTranspose2d(kernel 2f, stride f, no bias) starting as exact bilinear upsampling."""
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, factor, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    up.weight.requires_grad_(learnable)
    return up


def _crop(x: torch.Tensor, offset: int, height: int, width: int) -> torch.Tensor:
    if x.shape[2] < offset + height or x.shape[3] < offset + width:
        raise RuntimeError(f"cannot crop {tuple(x.shape[2:])} at {offset} to {height}x{width}")
    return x[:, :, offset:offset + height, offset:offset + width]


class FCN(SegmentationModel):
    """FCN-32s/16s/8s on VGG-16. Every layer learns at the base rate, biases at
    ``model.param_mults.bias`` (the reference solvers: lr_mult 2, decay_mult 0): the
    contract's default ``param_groups``.

    Args:
        num_classes: number of classes.
        stride: 32, 16 or 8, the finest stride whose scores are fused (FCN-<stride>s).
        pretrained: VGG-16 ImageNet checkpoint (path, URL, ``"imagenet"``) or ``None``;
            fc6/fc7 are converted from its classifier.
        learnable_upsampling: learn the 2x upsamplers (the final one is always fixed).
        skip_scaling: scale pool4 by 0.01 and pool3 by 1e-4 (reference "at-once" nets).
        dropout: dropout probability after fc6 and fc7 (0.5 in VGG and the paper).
        width: VGG-16's channels and fc6/fc7's 4096 times this (1: the paper's net; less: a
            small stand-in for ``segtrain.reproduce scale=tiny``).
    """

    def __init__(self, num_classes: int, stride: int, pretrained: str | None,
                 learnable_upsampling: bool, skip_scaling: bool, dropout: float,
                 width: float = 1.0) -> None:
        super().__init__()
        if stride not in CROP_FINAL:
            raise ValueError(f"stride must be 32, 16 or 8, got {stride}")
        self.stride = stride
        self.skip_scaling = skip_scaling
        self.backbone: VGG = vgg16(output_stride=32, pretrained=pretrained, width=width)
        channels, fc = self.backbone.feature_channels, max(1, round(4096 * width))
        # Caffe geometry: pad 100 on conv1_1 and ceil-mode pools (no parameter changes)
        self.backbone.features[0].padding = (100, 100)
        for m in self.backbone.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        self.fc6 = nn.Conv2d(channels["c5"], fc, 7)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.drop7 = nn.Dropout(dropout)
        if pretrained:
            fc6, fc7 = self.backbone.classifier[0], self.backbone.classifier[3]
            with torch.no_grad():
                self.fc6.weight.copy_(fc6.weight.view(4096, 512, 7, 7))
                self.fc6.bias.copy_(fc6.bias)
                self.fc7.weight.copy_(fc7.weight.view(4096, 4096, 1, 1))
                self.fc7.bias.copy_(fc7.bias)
        self.backbone.drop_classifier()
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        scores = [self.score_fr]
        if stride <= 16:
            self.score_pool4 = nn.Conv2d(channels["c4"], num_classes, 1)
            self.upscore2 = bilinear_upsampler(num_classes, 2, learnable_upsampling)
            scores.append(self.score_pool4)
        if stride == 8:
            self.score_pool3 = nn.Conv2d(channels["c3"], num_classes, 1)
            self.upscore_pool4 = bilinear_upsampler(num_classes, 2, learnable_upsampling)
            scores.append(self.score_pool3)
        self.upscore = bilinear_upsampler(num_classes, stride, learnable=False)
        for score in scores:  # zero-initialised class scoring (Sec. 4)
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        if not pretrained:
            for fc in (self.fc6, self.fc7):
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(fc.bias)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        feats = self.backbone.forward_features(image)
        x = self.drop6(self.relu(self.fc6(feats["c5"])))
        x = self.drop7(self.relu(self.fc7(x)))
        x = self.score_fr(x)
        if self.stride <= 16:
            x = self.upscore2(x)
            pool4 = feats["c4"] * 0.01 if self.skip_scaling else feats["c4"]
            x = x + _crop(self.score_pool4(pool4), CROP_POOL4, x.shape[2], x.shape[3])
        if self.stride == 8:
            x = self.upscore_pool4(x)
            pool3 = feats["c3"] * 1e-4 if self.skip_scaling else feats["c3"]
            x = x + _crop(self.score_pool3(pool3), CROP_POOL3, x.shape[2], x.shape[3])
        x = self.upscore(x)
        return {"out": _crop(x, CROP_FINAL[self.stride], h, w)}


def fcn32s(num_classes: int, **kwargs) -> FCN:
    """FCN-32s: score fc7, upsample 32x."""
    return FCN(num_classes, 32, **kwargs)


def fcn16s(num_classes: int, **kwargs) -> FCN:
    """FCN-16s: fuse 2x(fc7 scores) with pool4 scores, upsample 16x."""
    return FCN(num_classes, 16, **kwargs)


def fcn8s(num_classes: int, **kwargs) -> FCN:
    """FCN-8s: additionally fuse with pool3 scores, upsample 8x."""
    return FCN(num_classes, 8, **kwargs)
