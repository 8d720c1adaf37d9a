"""CPNet (Yu, Wang, Gao, Yu, Shen and Sang, "Context Prior for Scene Segmentation",
CVPR 2020).

Section "Network Architecture" and the overview figure: a dilated ResNet at output stride 8
gives the feature map X (``layer4``); the Context Prior Layer (``modules.context_prior``:
aggregation module, prior map P, intra- and inter-class contexts, concatenated with X)
follows; a 3x3 ConvBNReLU to 512 (official ``bottleneck``), dropout 0.1 and a 1x1 classifier
give the scores, upsampled bilinearly to the input (implementation details: the prediction
is upsampled eight times by bilinear interpolation). An auxiliary FCN head on stage 4 of the
ResNet (``layer3``, 3x3 conv to 256) adds the auxiliary loss, weight 0.4 as in PSPNet (the
paper's lambda_a; the weight lives in the loss config). In training mode the model returns
``out``, ``aux`` and ``prior`` (B x N x N), the map the affinity loss
(``losses/affinity.py``) supervises; in eval mode only ``out``. Head widths from the
official config (yu-changqian/ContextPrior ``config/cpnet_r50-d8.py``: prior_channels 512,
channels 512, am_kernel_size 11, prior_size 64 at 512x512 crops).

The backbone is the official config's mmsegmentation ``ResNetV1c`` (deep stem 32-32-64,
dilations 1, 1, 2, 4 with ``contract_dilation``: first blocks of layer3 / layer4 at 1 / 2),
``resnet101_v1c`` here (ResNet-101 as in the paper; the config's is 50). With
``conf/model/cpnet.yaml``, 19 classes and prior 64 x 64 the model has 71,146,118
parameters, the count of the reference code. With every weight copied from the reference
(``scripts/reference/compare_cpnet.py``, ``docs/reference/cpnet.md``) features, prior map
and logits are bit-identical, and the loss terms agree to float precision once the
differences below are taken out. Remaining differences, one per line:

- a feature map of another size than ``prior_size`` is resized to it and back
  (``modules.context_prior``); the official head asserts the sizes are equal;
- the affinity loss leaves ignored positions out, the official code counts 255 as one
  more class; a position alone in its class adds nothing to the global term here, the
  reference's clamp a constant (``losses/affinity.py``);
- the cross-entropy terms average over the labelled pixels; mmsegmentation 0.x (the
  reference's framework, ``avg_non_ignore=False``) over all pixels, ignored ones included,
  so its CE is ours times the labelled fraction;
- trained from scratch (``pretrained: null``), mmsegmentation's ResNet zero-initialises
  the last BN of every block (``zero_init_residual``), ours keeps torchvision's ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.models.backbones.build import build_backbone
from segtrain.models.base import SegmentationModel
from segtrain.models.modules.context_prior import ContextPriorLayer
from segtrain.models.modules.conv import ConvBNReLU
from segtrain.models.modules.heads import FCNHead


class CPNet(SegmentationModel):
    """Dilated backbone -> Context Prior Layer -> 3x3 conv -> classifier; aux head on ``c4``.

    Args:
        num_classes: number of classes.
        backbone: ``resnet50`` / ``resnet101`` (the paper) or another ``build_backbone`` name.
        output_stride: 8 in the paper.
        prior_channels: channels of the aggregated features and of each context (512).
        prior_size: (h, w) of the prior grid, N = h * w; crop / output stride in the paper.
        kernel_size: k of the aggregation module's separable convolutions (11).
        head_channels: channels of the 3x3 conv after the concatenation (512).
        aux_channels: channels of the auxiliary head's 3x3 conv (256); 0 removes it.
        dropout: dropout before both classifiers (0.1).
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels.
    """

    TRAIN_KEYS = frozenset({"out", "prior", "aux"})

    def __init__(self, num_classes: int, backbone: str, output_stride: int,
                 prior_channels: int, prior_size: Sequence[int], kernel_size: int,
                 head_channels: int, aux_channels: int, dropout: float,
                 pretrained: str | None, in_channels: int = 3) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, output_stride, pretrained,
                                       in_channels=in_channels)
        channels = self.backbone.feature_channels
        self.context_prior = ContextPriorLayer(channels["c5"], prior_channels, prior_size,
                                               kernel_size)
        self.head = nn.Sequential(
            ConvBNReLU(self.context_prior.out_channels, head_channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, num_classes, 1))
        self.aux_head = None
        if aux_channels:
            self.aux_head = FCNHead(channels["c4"], aux_channels, num_classes, dropout)

    @property
    def train_keys(self) -> frozenset[str]:
        return self.TRAIN_KEYS if self.aux_head is not None else frozenset({"out", "prior"})

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        size = image.shape[-2:]
        feats = self.backbone.forward_features(image)
        x, prior = self.context_prior(feats["c5"])
        outputs = {"out": F.interpolate(self.head(x), size, mode="bilinear",
                                        align_corners=False)}
        if self.training:
            outputs["prior"] = prior
            if self.aux_head is not None:
                aux = self.aux_head(feats["c4"])
                outputs["aux"] = F.interpolate(aux, size, mode="bilinear", align_corners=False)
        return outputs

    def head_modules(self) -> list[nn.Module]:
        """Context prior layer and both heads."""
        new = [self.context_prior, self.head]
        return new + ([self.aux_head] if self.aux_head is not None else [])
