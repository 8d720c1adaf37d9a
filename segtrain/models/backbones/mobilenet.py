"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018, Table 2 and Fig. 4(d)), with atrous convolution for dense prediction.

Table 2: a 3x3 stem conv (32 channels, stride 2), seven groups of inverted residual
bottlenecks (expansion t, channels c, repeats n, first stride s), a 1x1 conv to 1280 and
the classifier. A bottleneck is 1x1 expansion + BN + ReLU6, 3x3 depthwise + BN + ReLU6,
1x1 linear projection + BN, with a residual connection when stride is 1 and the channels
match. state_dict keys are identical to torchvision's ``mobilenet_v2`` (``features.N...``,
``classifier.1``; 3,504,872 parameters), so its ImageNet checkpoint loads unchanged.

Dense prediction (Sec. 6.3): once the requested output stride is reached, later strides
become 1 and the depthwise convolutions are dilated by the output-stride rule of
tensorflow/models slim MobileNets (the layer that would stride keeps rate r, the layers
after it use r * stride). DeepLab on MobileNetV2 uses the "second last feature map"
(Table 7, "MNet V2*"): the 320-channel output of the last bottleneck, here ``c5``; the
1x1 conv to 1280 (``features.18``) belongs to the ImageNet head and ``drop_classifier``
removes it together with ``classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from segtrain.models.backbones.pretrained import load_pretrained, widen_input_conv
from segtrain.models.modules.conv import ConvBNReLU

TORCHVISION_URLS = {
    "mobilenet_v2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}

# Table 2: expansion t, output channels c, repeats n, stride of the first repeat s.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# Index in ``features`` after which each dense feature is taken (strides 4, 8, 16, 32).
FEATURE_ENDS = {"c2": 3, "c3": 6, "c4": 13, "c5": 17}


def ConvBNReLU6(in_channels: int, out_channels: int, kernel_size: int = 3,  # noqa: N802
                stride: int = 1, dilation: int = 1, groups: int = 1) -> ConvBNReLU:
    """Conv (bias-free) + BN + ReLU6; the ``.0``/``.1`` key layout of torchvision."""
    return ConvBNReLU(in_channels, out_channels, kernel_size, stride, dilation, groups,
                      activation=nn.ReLU6)


class InvertedResidual(nn.Module):
    """Expansion 1x1 -> depthwise 3x3 (strided or dilated) -> linear 1x1 (Fig. 4(d)).

    Args:
        inp: input channels.
        oup: output channels.
        stride: depthwise stride (1 or 2).
        expand_ratio: expansion factor t.
        dilation: depthwise atrous rate.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
                 dilation: int = 1) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        # Every nominally strided block of Table 2 also changes the channel count, so the
        # residual test gives the same answer when dilation replaces the stride.
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, dilation, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with its ImageNet classifier and dense features.

    Args:
        output_stride: 8, 16 or 32; strides beyond it become dilation.
        num_classes: size of the ImageNet classifier.
        in_channels: input channels of the stem convolution.
    """

    def __init__(self, output_stride: int = 32, num_classes: int = 1000,
                 in_channels: int = 3) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        features: list[nn.Module] = [ConvBNReLU6(in_channels, 32, 3, stride=2)]
        current_stride, rate, inp = 2, 1, 32
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                if current_stride == output_stride:
                    # target reached: this layer keeps the current rate, later ones
                    # see rate * stride (tensorflow/models mobilenet.py)
                    features.append(InvertedResidual(inp, c, 1, t, dilation=rate))
                    rate *= stride
                else:
                    features.append(InvertedResidual(inp, c, stride, t))
                    current_stride *= stride
                inp = c
        features.append(ConvBNReLU6(inp, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        self.feature_channels = {"c2": 24, "c3": 32, "c4": 96, "c5": 320}
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of ``features[3, 6, 13, 17]`` under the keys c2..c5."""
        ends = {end: key for key, end in FEATURE_ENDS.items()}
        out: dict[str, torch.Tensor] = {}
        for i in range(FEATURE_ENDS["c5"] + 1):
            x = self.features[i](x)
            if i in ends:
                out[ends[i]] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, as torchvision's model computes them."""
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))

    def drop_classifier(self) -> MobileNetV2:
        """Remove the ImageNet head (``features.18`` and ``classifier``), unused by c2..c5."""
        self.features[18] = nn.Identity()
        self.classifier = nn.Identity()
        return self


def mobilenet_v2(output_stride: int = 32, pretrained: str | None = None,
                 in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2; ``pretrained`` is a path, a URL or ``"imagenet"`` (torchvision's)."""
    model = MobileNetV2(output_stride)
    if pretrained == "imagenet":
        pretrained = TORCHVISION_URLS["mobilenet_v2"]
    load_pretrained(model, pretrained)
    if in_channels != 3:
        model.features[0][0] = widen_input_conv(model.features[0][0], in_channels)
    return model
