"""Aligned Xception-65, the DeepLab v3+ backbone.

Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation", ECCV 2018, Sec. 3.2 and Fig. 4, modifying Chollet's Xception (CVPR 2017):
"(1) deeper Xception [...] (2) all max pooling operations are replaced by depthwise
separable convolution with striding [...] (3) extra batch normalization and ReLU
activation are added after each 3x3 depthwise convolution". The layout follows the
official ``xception_65`` of tensorflow/models ``research/deeplab/core/xception.py``:

- stem: 3x3 conv 32 stride 2, 3x3 conv 64 (each + BN + ReLU);
- entry flow: 3 units with depths (128,)*3, (256,)*3, (728,)*3, stride 2 on each unit's
  third separable conv, 1x1 conv + BN shortcut;
- middle flow: 16 units of (728,)*3, identity shortcut;
- exit flow: (728, 1024, 1024) stride 2 with conv shortcut, then (1536, 1536, 2048)
  without shortcut whose separable convs carry ReLU after both BNs.

In the entry/middle flow units and the first exit unit each separable conv is
``ReLU -> depthwise -> BN -> pointwise -> BN`` (official ``activation_fn_in_separable_conv
=False``: every depthwise conv has its BN, the ReLUs sit before each separable conv); in the
last exit unit it is ``depthwise -> BN -> ReLU -> pointwise -> BN -> ReLU``. BatchNorm
epsilon is 1e-3 as in the TensorFlow checkpoints. Output stride 8 or 16 replaces the
remaining strides by atrous rates exactly as the official ``stack_blocks_dense`` does (the
unit that would stride keeps the current rate; later units use rate * stride), and
``multi_grid`` sets the unit rates of the last block. ``c2`` is the stride-4 low-level
feature DeepLab v3+'s decoder reads: the second separable conv of entry-flow block 2
(``entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise``).

torchvision has no Xception checkpoint, so the keys follow this file; ``pretrained`` takes
a path or URL to a checkpoint in this layout (e.g. one converted from the official TF
ImageNet checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.pretrained import load_pretrained
from segtrain.models.modules.conv import SeparableConv2d

BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon in xception_arg_scope


class XceptionBlock(nn.Module):
    """One Xception unit: three separable convs and a shortcut.

    Args:
        in_channels: input channels.
        depths: output channels of the three separable convs.
        stride: stride of the third separable conv (and of a conv shortcut).
        dilation: atrous rate of the unit.
        unit_rates: per-conv multipliers of ``dilation`` (multi-grid).
        skip: ``"conv"`` (1x1 conv + BN shortcut), ``"sum"`` (identity) or ``"none"``.
        activation_in_sepconv: ReLU inside each separable conv (after both BNs) instead of
            one before it.
    """

    def __init__(self, in_channels: int, depths: Sequence[int], stride: int, dilation: int,
                 unit_rates: Sequence[int], skip: str, activation_in_sepconv: bool) -> None:
        super().__init__()
        if skip not in ("conv", "sum", "none"):
            raise ValueError(f"skip must be 'conv', 'sum' or 'none', got {skip!r}")
        if len(depths) != 3 or len(unit_rates) != 3:
            raise ValueError("an Xception unit has three separable convs")
        convs, ch = [], in_channels
        for i in range(3):
            convs.append(SeparableConv2d(ch, depths[i], 3, stride if i == 2 else 1,
                                         dilation * unit_rates[i],
                                         activation=activation_in_sepconv, bn_eps=BN_EPS))
            ch = depths[i]
        self.convs = nn.ModuleList(convs)
        self.pre_activation = not activation_in_sepconv
        self.skip = skip
        self.shortcut = None
        if skip == "conv":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, depths[-1], 1, stride, bias=False),
                nn.BatchNorm2d(depths[-1], eps=BN_EPS),
            )

    def forward_with_low_level(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit's output and the (pre-activation) output of its second separable conv."""
        residual, low_level = x, x
        for i, conv in enumerate(self.convs):
            if self.pre_activation:
                # not in place: ``x`` feeds the shortcut and ``low_level`` must stay linear
                residual = F.relu(residual)
            residual = conv(residual)
            if i == 1:
                low_level = residual
        if self.skip == "conv":
            residual = residual + self.shortcut(x)
        elif self.skip == "sum":
            residual = residual + x
        return residual, low_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_low_level(x)[0]


class Xception(nn.Module):
    """Aligned Xception-65 with an ImageNet classifier and dense features.

    Args:
        output_stride: 8, 16 or 32.
        multi_grid: unit rates of the three separable convs of the last exit-flow block
            (``None`` = ``(1, 1, 1)``).
        num_classes: size of the ImageNet classifier ``fc``.
        in_channels: input channels of the stem.
        middle_blocks: number of middle-flow units (16 for Xception-65).
    """

    def __init__(self, output_stride: int = 32, multi_grid: Sequence[int] | None = None,
                 num_classes: int = 1000, in_channels: int = 3, middle_blocks: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32, eps=BN_EPS),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64, eps=BN_EPS),
            nn.ReLU(inplace=True),
        )
        current_stride, rate = 2, 1

        def unit(in_ch: int, depths: Sequence[int], stride: int, skip: str,
                 activation_in_sepconv: bool = False,
                 unit_rates: Sequence[int] = (1, 1, 1)) -> XceptionBlock:
            # the official stack_blocks_dense: past the target stride, stride becomes rate
            nonlocal current_stride, rate
            if current_stride == output_stride:
                block = XceptionBlock(in_ch, depths, 1, rate, unit_rates, skip,
                                      activation_in_sepconv)
                rate *= stride
            else:
                block = XceptionBlock(in_ch, depths, stride, 1, unit_rates, skip,
                                      activation_in_sepconv)
                current_stride *= stride
            return block

        self.entry_flow = nn.Sequential(
            unit(64, (128,) * 3, 2, "conv"),
            unit(128, (256,) * 3, 2, "conv"),
            unit(256, (728,) * 3, 2, "conv"),
        )
        self.middle_flow = nn.Sequential(
            *[unit(728, (728,) * 3, 1, "sum") for _ in range(middle_blocks)]
        )
        self.exit_flow = nn.Sequential(
            unit(728, (728, 1024, 1024), 2, "conv"),
            unit(1024, (1536, 1536, 2048), 1, "none", activation_in_sepconv=True,
                 unit_rates=tuple(multi_grid) if multi_grid else (1, 1, 1)),
        )
        self.fc = nn.Linear(2048, num_classes)
        self.feature_channels = {"c2": 256, "c3": 256, "c4": 728, "c5": 2048}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """c2: stride-4 low-level features; c3: entry block 2; c4: middle flow; c5: exit."""
        x = self.entry_flow[0](self.stem(x))
        c3, c2 = self.entry_flow[1].forward_with_low_level(x)
        c4 = self.middle_flow(self.entry_flow[2](c3))
        c5 = self.exit_flow(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (global average pooling + ``fc``)."""
        c5 = self.forward_features(x)["c5"]
        return self.fc(c5.mean(dim=(2, 3)))

    def drop_classifier(self) -> Xception:
        self.fc = nn.Identity()
        return self


def xception65(output_stride: int = 32, pretrained: str | None = None,
               multi_grid: Sequence[int] | None = None, in_channels: int = 3) -> Xception:
    """Aligned Xception-65; ``pretrained`` is a path or URL in this module's key layout."""
    if pretrained == "imagenet":
        raise ConfigError(
            "model.pretrained=imagenet: segtrain cannot obtain Xception-65 ImageNet weights "
            "(they exist only as the TensorFlow checkpoint xception_65 of tensorflow/models "
            "research/deeplab); provide them converted to segtrain's Xception keys as "
            "model.pretrained=<path or URL>, or use model.backbone=resnet101 or "
            "model.pretrained=null")
    model = Xception(output_stride, multi_grid, in_channels=in_channels)
    return load_pretrained(model, pretrained)
