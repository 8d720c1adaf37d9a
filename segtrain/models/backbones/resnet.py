"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1).

Dilated for dense prediction as in DeepLab (Chen et al., TPAMI 2017, Sec. 3.1): the strides
of the last stages are replaced by dilation to reach output stride 8 or 16, with optional
multi-grid rates in the last stage (DeepLab v3, Sec. 3.2). state_dict keys are identical to
torchvision's ``resnet*`` checkpoints (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``fc``), so ImageNet weights load with ``strict=True``.

Deep stems (Bag of Tricks, He et al., CVPR 2019, Sec. 4.2, "ResNet-C"): the 7x7 stem
convolution becomes three 3x3 convolutions of ``w, w, 2w`` channels, each followed by BN
and ReLU, as the segmentation codebases build ResNet. ``w = 64`` is PyTorch-Encoding's
``resnet*s`` (the ImageNet ResNet of PSPNet; HANet's and SPNet's references), ``w = 32``
mmsegmentation's ``ResNetV1c`` (CPNet's reference). Our keys for such a stem are
PyTorch-Encoding's (``conv1.0``, ``conv1.1``, ``conv1.3``, ``conv1.4``, ``conv1.6``,
``bn1``); ``deep_stem_state`` renames the other two layouts a deep-stem ImageNet
checkpoint comes in, mmsegmentation's ``stem.0 .. stem.7`` and CSAIL's flat ``conv1, bn1,
conv2, bn2, conv3, bn3`` (the ``resnet101-imagenet.pth`` HANet's README links), so each
loads strictly.

``contract_dilation`` (mmsegmentation's name): the first block of a dilated stage uses
half the stage's dilation, i.e. the previous one (torchvision, PyTorch-Encoding and
mmsegmentation with ``contract_dilation=True``); ``False`` dilates every block of the
stage alike, as HANet's reference does (layer3 at 2 and layer4 at 4 from the first block).

A block may carry a ``gate``: a module mapping the output of its last 3x3 convolution to
multiplicative weights, applied before the 1x1 expansion (Bottleneck) or the residual sum
(BasicBlock). SPNet puts its strip pooling module there (Hou et al., CVPR 2020, Sec. 3.4);
the gate's parameters sit under ``<block>.gate.*``, so torchvision keys are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.models.backbones.pretrained import load_pretrained, widen_input_conv

# ImageNet checkpoints of the deep-stem variants, in the layouts ``deep_stem_state`` reads:
# CSAIL's (sceneparsing.csail.mit.edu, the file HANet's README links) and OpenMMLab's
# ``open-mmlab://resnet*_v1c``. PyTorch-Encoding's own ``resnet*s`` files are zip archives:
# unzip one and pass its path.
DEEP_STEM_URLS = {
    "resnet50s": "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet50-imagenet.pth",
    "resnet101s":
        "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet101-imagenet.pth",
    "resnet50_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    "resnet101_v1c":
        "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}
# stem widths w of the deep stems (w, w, 2w channels), by name suffix
STEM_WIDTHS = {"": 0, "s": 64, "_v1c": 32}

TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet152": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, stage_dilation: int | None = None) -> None:
        super().__init__()
        # in the first block of a dilated stage conv1 takes the place of the removed stride
        # (previous dilation) and conv2 already sees the stage's dilation, which makes the
        # network the exact dilated equivalent of the strided one
        d2 = stage_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=d2, dilation=d2, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.gate: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.gate is not None:
            out = out * self.gate(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with the stride on the 3x3 (torchvision's "v1.5")."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, stage_dilation: int | None = None) -> None:
        super().__init__()
        del stage_dilation  # the 3x3 is the strided conv: one dilation serves the block
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.gate: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.gate is not None:
            out = out * self.gate(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with an ImageNet classifier (for checkpoint compatibility) and dense features.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(3, 4, 23, 3)`` for ResNet-101.
        output_stride: 8, 16 or 32; strides of the last stages become dilation.
        multi_grid: dilation multipliers for the blocks of ``layer4`` (DeepLab v3 uses 1, 2, 4).
        num_classes: size of the ImageNet classifier ``fc``.
        in_channels: input channels.
        stem_width: 0 for the 7x7 stem; ``w > 0`` for the deep stem of ``w, w, 2w`` channels.
        contract_dilation: the first block of a dilated stage keeps the previous dilation.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 output_stride: int = 32, multi_grid: Sequence[int] | None = None,
                 num_classes: int = 1000, in_channels: int = 3, stem_width: int = 0,
                 contract_dilation: bool = True) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        dilate3 = output_stride == 8
        dilate4 = output_stride in (8, 16)
        self.output_stride = output_stride
        self.stem_width = stem_width
        self.contract_dilation = contract_dilation
        self.inplanes = 2 * stem_width if stem_width else 64
        self.dilation = 1
        if stem_width:
            w = stem_width
            self.conv1: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False))
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=dilate3)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=dilate4,
                                       multi_grid=multi_grid)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        e = block.expansion
        self.feature_channels = {"c2": 64 * e, "c3": 128 * e, "c4": 256 * e, "c5": 512 * e}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False, multi_grid: Sequence[int] | None = None) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        grid = list(multi_grid) if multi_grid else [1] * blocks
        if len(grid) != blocks:
            raise ValueError(f"multi_grid {grid} must have one rate per block ({blocks})")
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # torchvision keeps the previous dilation in the first block of a dilated stage
        # (contract_dilation); with multi-grid every block uses (stage rate x grid[i]) as in
        # DeepLab v3.
        contract = self.contract_dilation and not multi_grid
        first = previous_dilation if contract else self.dilation * grid[0]
        blocks_ = [block(self.inplanes, planes, stride, first, downsample,
                         stage_dilation=self.dilation * grid[0])]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            blocks_.append(block(self.inplanes, planes, dilation=self.dilation * grid[i]))
        return nn.Sequential(*blocks_)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits, as torchvision's model computes them."""
        c5 = self.forward_features(x)["c5"]
        return self.fc(torch.flatten(self.avgpool(c5), 1))

    def drop_classifier(self) -> ResNet:
        """Remove ``fc`` once pretrained weights are in, so no parameter goes unused."""
        self.fc = nn.Identity()
        return self


_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def _rename(state: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        prefix = head + "." + rest.split(".")[0] if head == "stem" else head
        new = table.get(prefix)
        out[new + key[len(prefix):] if new else key] = value
    return out


# our deep-stem keys (PyTorch-Encoding's) from mmsegmentation's and from CSAIL's
_FROM_MMSEG = {"stem.0": "conv1.0", "stem.1": "conv1.1", "stem.3": "conv1.3",
               "stem.4": "conv1.4", "stem.6": "conv1.6", "stem.7": "bn1"}
_FROM_CSAIL = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4",
               "conv3": "conv1.6", "bn3": "bn1"}


def deep_stem_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deep-stem ResNet checkpoint in our (PyTorch-Encoding's) keys.

    mmsegmentation's ``stem.0 .. stem.7`` and CSAIL's top-level ``conv1..3`` / ``bn1..3``
    are renamed; PyTorch-Encoding's keys pass unchanged. All three apply conv-BN-ReLU three
    times, so only the names differ.
    """
    if any(k.startswith("stem.") for k in state):
        return _rename(state, _FROM_MMSEG)
    if "conv2.weight" in state:  # a top-level conv2 exists only in CSAIL's layout
        return _rename(state, _FROM_CSAIL)
    return state


def resnet(depth: int, output_stride: int = 32, multi_grid: Sequence[int] | None = None,
           pretrained: str | None = None, in_channels: int = 3, stem: str = "",
           contract_dilation: bool = True) -> ResNet:
    """Build ResNet-``depth``; ``pretrained`` is a path, a URL or ``"imagenet"``.

    ``stem``: ``""`` (torchvision's 7x7), ``"s"`` (deep stem 64-64-128) or ``"_v1c"`` (deep
    stem 32-32-64), the suffixes of the backbone names ``resnet101s`` / ``resnet101_v1c``.
    """
    name = f"resnet{depth}"
    if name not in _SPECS:
        raise ValueError(f"unknown ResNet depth {depth}; choose from 18, 34, 50, 101, 152")
    if stem not in STEM_WIDTHS:
        raise ValueError(f"unknown ResNet stem {stem!r}; choose from {list(STEM_WIDTHS)}")
    block, layers = _SPECS[name]
    model = ResNet(block, layers, output_stride, multi_grid, stem_width=STEM_WIDTHS[stem],
                   contract_dilation=contract_dilation)
    if pretrained == "imagenet":
        urls = DEEP_STEM_URLS if stem else TORCHVISION_URLS
        if name + stem not in urls:
            raise ValueError(f"no ImageNet checkpoint known for {name + stem}; pass a path "
                             f"(model.pretrained=/path/to/file.pth); known: {sorted(urls)}")
        pretrained = urls[name + stem]
    if stem:
        # a deep-stem checkpoint may come without the ImageNet classifier (mmsegmentation's)
        load_pretrained(model, pretrained, convert=deep_stem_state, optional=("fc.",))
    else:
        load_pretrained(model, pretrained)
    if in_channels != 3:
        if stem:
            model.conv1[0] = widen_input_conv(model.conv1[0], in_channels)
        else:
            model.conv1 = widen_input_conv(model.conv1, in_channels)
    return model


def resnet18(**kw) -> ResNet:
    return resnet(18, **kw)


def resnet34(**kw) -> ResNet:
    return resnet(34, **kw)


def resnet50(**kw) -> ResNet:
    return resnet(50, **kw)


def resnet101(**kw) -> ResNet:
    return resnet(101, **kw)
