"""DeepLab v1 and v2 (Chen et al., ICLR 2015 "Semantic Image Segmentation with Deep
Convolutional Nets and Fully Connected CRFs"; Chen et al., TPAMI 2017 "DeepLab: ... Atrous
Convolution, and Fully Connected CRFs").

- DeepLab v1 "LargeFOV" (v1 Table 2 and the released ``DeepLab-LargeFOV/train.prototxt``):
  VGG-16 whose pools are 3x3 with padding 1 (stride 2 for pool1-pool3, stride 1 for pool4
  and pool5, so output stride 8; conv5 dilated by 2), a 3x3 average pooling with stride 1
  and padding 1 ("pool5a") before fc6, fc6 = 3x3 convolution with dilation 12 and 1024
  channels, fc7 = 1x1 with 1024 channels, fc8 = 1x1 classifier; element-wise dropout 0.5
  (Caffe's ``Dropout``) after fc6 and fc7. Only fc8 learns at 10x (weights) / 20x (biases).
- DeepLab v2 (v2 Sec. 3.2, Fig. 4, Table 3-4): ResNet-101 at output stride 8 with Atrous
  Spatial Pyramid Pooling: parallel classifiers with dilation 2,4,8,12 (ASPP-S) or
  6,12,18,24 (ASPP-L) whose logits are summed; the LargeFOV head (one branch, dilation 12)
  is the paper's baseline. ``head: plain`` (no rates) is TABLE 4's first rows, ResNet-101
  without LargeFOV or ASPP (68.72, 71.27 with MSC): one 1x1 classifier on the last
  feature map. With ResNet each branch is one 3x3 atrous convolution to the
  classes (the released ResNet-101 prototxt); with VGG-16 (the network of the head
  ablation, Table 3-4) each branch is its own fc6 (3x3 atrous, 1024) -> ReLU -> dropout ->
  fc7 (1x1, 1024) -> ReLU -> dropout -> fc8 (1x1, classes), on the same 3x3-pooled VGG-16
  as v1 but without pool5a (the released VGG-16 ASPP-L net, as ported to Keras from its
  prototxt).

Logits at stride 8 are bilinearly upsampled to the input size (v2 Sec. 3.1); the stride-8
logits are also returned as ``"out_lowres"`` for a loss against shrunk labels, as the
released Caffe models train (``loss.label_stride``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.resnet import ResNet, resnet
from segtrain.models.backbones.vgg import VGG, vgg16
from segtrain.models.base import SegmentationModel
from segtrain.models.param_groups import ParamMults, backbone_head_groups


class AtrousBranch(nn.Module):
    """One DeepLab classifier branch.

    ``fc`` form (VGG-16): fc6 3x3 dilated to ``hidden`` channels, ReLU, dropout, fc7 1x1,
    ReLU, dropout, fc8 1x1 to the classes. ``conv`` form (ResNet): a single 3x3 dilated
    convolution to the classes. The dropout is element-wise, as Caffe's ``Dropout`` layer of
    the released prototxts (not channel-wise ``Dropout2d``). ``self.classifier`` is the
    layer that produces the logits (fc8, or the single convolution).
    """

    def __init__(self, in_channels: int, num_classes: int, rate: int,
                 hidden: int | None, dropout: float = 0.5, kernel_size: int = 3) -> None:
        super().__init__()
        if hidden:
            self.layers = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=rate, dilation=rate),  # fc6
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Conv2d(hidden, hidden, 1),  # fc7
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Conv2d(hidden, num_classes, 1),  # fc8
            )
        else:
            self.layers = nn.Sequential(nn.Conv2d(
                in_channels, num_classes, kernel_size, padding=rate * (kernel_size // 2),
                dilation=rate))
        # DeepLab initialises the classifiers with N(0, 0.01) and zero bias.
        for m in self.layers.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.layers[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ASPPv2(nn.Module):
    """Atrous Spatial Pyramid Pooling of DeepLab v2: parallel branches, logits summed (Fig. 4)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int],
                 hidden: int | None, dropout: float = 0.5) -> None:
        super().__init__()
        if not rates:  # TABLE 4's baseline: one 1x1 classifier, no atrous branch
            self.branches = nn.ModuleList(
                [AtrousBranch(in_channels, num_classes, 1, None, dropout, kernel_size=1)])
            return
        self.branches = nn.ModuleList(
            AtrousBranch(in_channels, num_classes, int(r), hidden, dropout) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def _build_backbone(name: str, output_stride: int, pretrained: str | None,
                    in_channels: int, pool_kernel: int) -> tuple[nn.Module, int, int | None]:
    """Return (backbone, its output channels, fc6 width of the VGG form or None)."""
    if name.startswith("resnet"):
        depth = int(name.removeprefix("resnet"))
        if pool_kernel != 2:
            raise ConfigError(f"model.pool_kernel={pool_kernel}: DeepLab's 3x3 pools apply to "
                              f"the vgg16 backbone only; expected 2 with {name}")
        net = resnet(depth, output_stride=output_stride, pretrained=pretrained,
                     in_channels=in_channels)
        return net.drop_classifier(), net.feature_channels["c5"], None
    if name == "vgg16":
        if in_channels != 3:
            raise ValueError("the VGG-16 DeepLab takes 3 input channels")
        net = vgg16(output_stride=output_stride, pretrained=pretrained, pool_kernel=pool_kernel)
        return net, 512, 1024
    raise ValueError(f"DeepLab v1/v2 backbone must be resnet18/34/50/101/152 or vgg16, "
                     f"got {name!r}")


def _transplant_vgg_fc(backbone: VGG, branch: AtrousBranch) -> None:
    """Initialise fc6/fc7 of a VGG-form branch by subsampling VGG-16's ImageNet fc layers.

    DeepLab v1 Sec. 4.1: the 4096x(512x7x7) fc6 is decimated to 1024 filters of 3x3 (every
    4th filter, spatial positions 0, 3, 6), fc7 to 1024x1024 (every 4th input and output).
    With ASPP every branch starts from these same weights (only the dilation differs).
    """
    fc6, fc7 = backbone.classifier[0], backbone.classifier[3]
    conv6, conv7 = branch.layers[0], branch.layers[3]
    with torch.no_grad():
        w6 = fc6.weight.view(4096, 512, 7, 7)[::4][:, :, ::3, ::3]
        conv6.weight.copy_(w6)
        conv6.bias.copy_(fc6.bias[::4])
        conv7.weight.copy_(fc7.weight[::4, ::4].view(1024, 1024, 1, 1))
        conv7.bias.copy_(fc7.bias[::4])


class DeepLab(SegmentationModel):
    """Backbone at output stride 8 followed by the DeepLab v1/v2 classifier head.

    Args:
        num_classes: number of classes.
        backbone: ``resnet101`` (v2), ``resnet50``, ``resnet18`` ... or ``vgg16`` (v1, and
            the v2 head ablation).
        output_stride: 8 in both papers.
        head: a key of ``head_rates`` (``aspp_s``, ``aspp_l``, ``largefov``, ``plain``).
        head_rates: dilation rates of each head's branches; none (``plain``): a 1x1
            classifier (ResNet backbones).
        pretrained: ImageNet checkpoint for the backbone (path, URL or ``"imagenet"``).
        freeze_bn: keep BatchNorm statistics and affine weights fixed (v2 trains so,
            starting from ImageNet statistics).
        dropout: element-wise dropout after fc6/fc7 of the VGG form.
        head_lr_mult, head_bias_lr_mult: learning-rate multiples of the classifiers' (fc8)
            weights and biases (DeepLab: 10 and 20); fc6/fc7 learn with the backbone.
        in_channels: input channels (4 for RGB-D; ResNet backbones only).
        pool_kernel: VGG-16 pools, 2 (VGG's 2x2) or 3 (the released DeepLab nets' 3x3 pools
            with padding 1).
        fc6_avg_pool: a 3x3 average pooling (stride 1, padding 1) before the head, the
            "pool5a" layer of the released DeepLab v1 LargeFOV prototxt.
    """

    # "out_lowres": the logits before the final upsampling, for loss.label_stride
    TRAIN_KEYS = frozenset({"out", "out_lowres"})

    def __init__(self, num_classes: int, backbone: str, output_stride: int, head: str,
                 head_rates: Mapping[str, Sequence[int]], pretrained: str | None = None,
                 freeze_bn: bool = False, dropout: float = 0.5, head_lr_mult: float = 10.0,
                 head_bias_lr_mult: float = 20.0, in_channels: int = 3, pool_kernel: int = 2,
                 fc6_avg_pool: bool = False) -> None:
        super().__init__()
        self.head_lr_mult, self.head_bias_lr_mult = head_lr_mult, head_bias_lr_mult
        if head not in head_rates:
            raise ValueError(f"model.head={head!r} is not one of {sorted(head_rates)}")
        if not head_rates[head] and backbone == "vgg16":
            raise ConfigError(f"model.head={head} (no rates: a 1x1 classifier) is a ResNet "
                              f"head; with vgg16 use largefov or aspp_s/aspp_l")
        self.backbone, channels, hidden = _build_backbone(backbone, output_stride, pretrained,
                                                          in_channels, pool_kernel)
        # Caffe's AVE pooling divides by the full 3x3 window, padding included
        self.pool5a = nn.AvgPool2d(3, 1, 1, count_include_pad=True) if fc6_avg_pool \
            else nn.Identity()
        self.head = ASPPv2(channels, num_classes, list(head_rates[head]), hidden, dropout)
        if isinstance(self.backbone, VGG):
            if pretrained:
                for branch in self.head.branches:
                    _transplant_vgg_fc(self.backbone, branch)
            self.backbone.drop_classifier()
        self.set_freeze_bn(freeze_bn)  # the backbone's BatchNorms: the head has none

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone.forward_features(image)["c5"]
        logits = self.head(self.pool5a(feats))
        out = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training:
            return {"out": out}
        # out_lowres: the stride-8 logits the Caffe models train on (loss.label_stride)
        return {"out": out, "out_lowres": logits}

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def param_groups(self, mults: ParamMults | None = None) -> list[dict]:
        """fc8 (each branch's classifier) weights at ``head_lr_mult`` and biases at
        ``head_bias_lr_mult`` (the released prototxts: 10x / 20x); the backbone and fc6/fc7,
        which start from ImageNet's fc layers, at 1x."""
        classifiers = [b.classifier for b in self.head.branches]
        fc67 = [m for b in self.head.branches for m in b.layers[:-1]]
        return backbone_head_groups([self.backbone, *fc67], classifiers, self.head_lr_mult,
                                    self.head_bias_lr_mult, mults)


class DeepLabV1(DeepLab):
    """DeepLab v1 LargeFOV: VGG-16 with 3x3 pools, output stride 8, pool5a, fc6 3x3 dilation
    12 with 1024 channels (conf/model/deeplabv1.yaml)."""


class DeepLabV2(DeepLab):
    """DeepLab v2: ResNet-101 (conf/model/deeplabv2.yaml) or VGG-16 (the head ablation,
    conf/model/deeplabv2_vgg16.yaml), output stride 8, ASPP-S / ASPP-L / LargeFOV head."""


__all__ = ["ASPPv2", "AtrousBranch", "DeepLab", "DeepLabV1", "DeepLabV2", "ResNet"]
