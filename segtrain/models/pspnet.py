"""PSPNet (Zhao, Shi, Qi, Wang and Jia, "Pyramid Scene Parsing Network", CVPR 2017).

Sec. 3.2-3.3 and Fig. 3: a dilated ResNet (output stride 8) gives the feature map; the
pyramid pooling module (``modules.ppm``, bins 1, 2, 3, 6, each reduced to 1/4 of the
channels) adds global context; a 3x3 conv (512) + BN + ReLU + dropout 0.1 and a 1x1
classifier give the scores, upsampled bilinearly to the input. Sec. 3.4 and Fig. 4: an
auxiliary FCN head on ResNet's stage 4 (``res4b22``, our ``layer3`` = ``c4``; 3x3 conv 256
+ BN + ReLU + dropout 0.1 + 1x1) deepens supervision during training; its output is
returned as ``"aux"`` in training mode only, and its weight (0.4) belongs to the loss
config. Head layout and aligned-corner upsampling follow the authors' reference code
(hszhao/semseg ``pspnet.py``). That code's ResNet has a three-conv "deep base" stem; ours
is torchvision's (so its ImageNet checkpoints load), 123,776 parameters fewer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.backbones.build import build_backbone
from segtrain.models.base import SegmentationModel
from segtrain.models.modules.heads import FCNHead
from segtrain.models.modules.ppm import PyramidPooling


class PSPNet(SegmentationModel):
    """Dilated backbone -> pyramid pooling -> FCN head; auxiliary head on ``c4``.

    Args:
        num_classes: number of classes.
        backbone: backbone name for ``build_backbone`` (``resnet50``, ``resnet101``, ...).
        output_stride: 8 in the paper.
        bins: pyramid pooling bin sizes, ``(1, 2, 3, 6)`` in the paper.
        head_channels: channels of the 3x3 conv after pyramid pooling (512).
        aux_channels: channels of the auxiliary head's 3x3 conv (256); 0 removes it.
        dropout: dropout before both classifiers (0.1).
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels (e.g. 4 for RGB-D).
    """

    TRAIN_KEYS = frozenset({"out", "aux"})

    def __init__(self, num_classes: int, backbone: str, output_stride: int,
                 bins: Sequence[int], head_channels: int, aux_channels: int, dropout: float,
                 pretrained: str | None, in_channels: int = 3) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, output_stride, pretrained,
                                       in_channels=in_channels)
        channels = self.backbone.feature_channels
        self.ppm = PyramidPooling(channels["c5"], bins, channels["c5"] // len(bins))
        self.head = FCNHead(self.ppm.out_channels, head_channels, num_classes, dropout)
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
        out = self.head(self.ppm(feats["c5"]))
        outputs = {"out": F.interpolate(out, size, mode="bilinear", align_corners=True)}
        if self.training and self.aux_head is not None:
            aux = self.aux_head(feats["c4"])
            outputs["aux"] = F.interpolate(aux, size, mode="bilinear", align_corners=True)
        return outputs

    def head_modules(self) -> list[nn.Module]:
        """Pyramid pooling and both heads (hszhao/semseg train.py ``modules_new``)."""
        return [self.ppm, self.head] + ([self.aux_head] if self.aux_head is not None else [])
