"""SPNet (Hou, Zhang, Cheng and Feng, "Strip Pooling: Rethinking Spatial Pooling for Scene
Parsing", CVPR 2020).

Sec. 3.4 ("Strip pooling networks"): a dilated ResNet at output stride 8 whose strip pooling
modules (``modules.strip_pooling.StripPoolingModule``, Fig. 2) gate the output of the 3x3
convolution of the last building block of every stage and of all building blocks of the
last stage, as the authors' code selects them (Andrew-Qibin/SPNet ``models/resnet.py``,
``spm_on``). The head (authors' ``SPHead``): a 1x1 convolution reducing the 2048 channels
of ``layer4`` to 1024, two mixed pooling modules (Fig. 3, Sec. 3.3), a 3x3 convolution to
512 + BN + ReLU + dropout 0.1 and the 1x1 classifier; logits upsampled bilinearly with
aligned corners. An auxiliary FCN head on ``layer3`` (256 channels) is trained with weight
0.4, as in PSPNet (the authors' config: ``aux_weight: 0.4``; the weight lives in the loss
config). Learning rates as the authors' ``tool/train.py``: backbone (its SPMs included) at
the base rate, head and auxiliary head at 10x.

The backbone is the reference's (houqb/SPNet ``models/resnet.py``, ``deep_base=True``):
ResNet-101 with the deep stem 64-64-128 (``resnet101s``), layer3 dilated 2 (first block
1), layer4 with multi-grid dilations 4, 8, 16. With ``conf/model/spnet.yaml`` and 19
classes the model has 66,729,382 parameters, the count of the reference code; with the
reference's weights copied in, its logits, auxiliary logits and features equal the
reference's to float rounding, in eval and training mode
(``scripts/reference/compare_spnet.py``, ``docs/reference/spnet.md``). Remaining
differences from the reference code, one per line:

- ``pretrained: imagenet`` loads CSAIL's deep-stem ResNet-101; the authors' file is
  PyTorch-Encoding's ``resnet101-2a57e44d.zip`` (same layout: unzip it and pass its path);
- with a ResNet-18/34 (BasicBlock) the last 3x3 conv of a block is gated here; the
  reference has no SPM in its BasicBlock (it trains ResNet-50/101 only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.backbones.build import build_backbone
from segtrain.models.base import SegmentationModel
from segtrain.models.modules.conv import ConvBNReLU
from segtrain.models.modules.heads import FCNHead
from segtrain.models.modules.strip_pooling import MixedPoolingModule, StripPoolingModule

STAGES = ("layer1", "layer2", "layer3", "layer4")


def insert_strip_pooling(backbone: nn.Module) -> list[nn.Module]:
    """Give the last block of ``layer1..3`` and every block of ``layer4`` an SPM gate.

    Returns the blocks that received one. The backbone must be a ResNet of
    ``backbones/resnet.py`` (its blocks apply ``gate`` after their last 3x3 conv).
    """
    if not all(hasattr(backbone, s) for s in STAGES):
        raise ValueError("strip pooling in the backbone needs a ResNet backbone")
    chosen = [getattr(backbone, s)[-1] for s in STAGES[:-1]] + list(backbone.layer4)
    for block in chosen:
        block.gate = StripPoolingModule(block.conv2.out_channels)
    return chosen


class SPNet(SegmentationModel):
    """Dilated ResNet with SPMs -> 1x1 reduction -> two MPMs -> FCN classifier.

    Args:
        num_classes: number of classes.
        backbone: ``resnet50`` / ``resnet101`` (the paper) or any ResNet of ``build_backbone``.
        output_stride: 8 in the paper.
        multi_grid: unit rates of ``layer4`` or ``None``; the authors' ResNet-101 uses
            (1, 2, 4), i.e. dilations 4, 8, 16 (``models/base.py``, ``multi_grid=True``).
        backbone_spm: insert SPMs into the backbone (Sec. 3.4; ``spm_on`` of the authors).
        reduce_channels: channels after the head's 1x1 reduction, i.e. of the MPMs (1024).
        pool_sizes: the two pyramid bins of each MPM's short-range half (20, 12).
        head_channels: channels of the 3x3 conv before the classifier (512).
        aux_channels: channels of the auxiliary head's 3x3 conv (256); 0 removes it.
        dropout: dropout before both classifiers (0.1).
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels.
    """

    TRAIN_KEYS = frozenset({"out", "aux"})

    def __init__(self, num_classes: int, backbone: str, output_stride: int,
                 multi_grid: Sequence[int] | None, backbone_spm: bool, reduce_channels: int,
                 pool_sizes: Sequence[int], head_channels: int, aux_channels: int,
                 dropout: float, pretrained: str | None, in_channels: int = 3) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, output_stride, pretrained,
                                       tuple(multi_grid) if multi_grid else None, in_channels)
        if backbone_spm:
            insert_strip_pooling(self.backbone)
        channels = self.backbone.feature_channels
        self.reduce = ConvBNReLU(channels["c5"], reduce_channels, 1)
        self.mpm = nn.Sequential(MixedPoolingModule(reduce_channels, pool_sizes),
                                 MixedPoolingModule(reduce_channels, pool_sizes))
        self.head = FCNHead(reduce_channels, head_channels, num_classes, dropout)
        self.aux_head = None
        if aux_channels:
            self.aux_head = FCNHead(channels["c4"], aux_channels, num_classes, dropout)

    @property
    def train_keys(self) -> frozenset[str]:
        return self.TRAIN_KEYS if self.aux_head is not None else frozenset({"out"})

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        size = image.shape[-2:]
        feats = self.backbone.forward_features(image)
        out = self.head(self.mpm(self.reduce(feats["c5"])))
        outputs = {"out": F.interpolate(out, size, mode="bilinear", align_corners=True)}
        if self.training and self.aux_head is not None:
            aux = self.aux_head(feats["c4"])
            outputs["aux"] = F.interpolate(aux, size, mode="bilinear", align_corners=True)
        return outputs

    def head_modules(self) -> list[nn.Module]:
        """Reduction, MPMs and both heads (the authors' tool/train.py ``modules_new``); the
        backbone's SPMs are backbone."""
        new = [self.reduce, self.mpm, self.head]
        return new + ([self.aux_head] if self.aux_head is not None else [])
