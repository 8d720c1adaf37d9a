"""Backbones by name, so any backbone can feed any head that fits.

``build_backbone`` returns a feature extractor: ``forward_features(x)`` gives ``c2..c5`` and
``feature_channels`` their widths; the ImageNet classifier is dropped after the weights are
loaded. ``set_backbone_output_stride`` re-dilates a built backbone in place (same
parameters), e.g. to train DeepLab v3 at output stride 16 and evaluate at 8 (Chen et al.,
arXiv 1706.05587, Sec. 4.1 and Table 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.models.backbones.mobilenet import mobilenet_v2
from segtrain.models.backbones.resnet import ResNet, resnet
from segtrain.models.backbones.vgg import vgg16
from segtrain.models.backbones.xception import xception65

# resnet<depth>: torchvision's 7x7 stem; resnet<depth>s: the deep stem 64-64-128
# (PyTorch-Encoding's resnet101s); resnet<depth>_v1c: the deep stem 32-32-64
# (mmsegmentation's ResNetV1c). See backbones/resnet.py.
RESNETS = {f"resnet{depth}{stem}": (depth, stem) for stem in ("", "s", "_v1c")
           for depth in (18, 34, 50, 101, 152)}
BACKBONES = (*RESNETS, "vgg16", "vgg16_bn", "mobilenetv2", "xception65")


def _construct(name: str, output_stride: int, pretrained: str | None,
               multi_grid: Sequence[int] | None, in_channels: int,
               contract_dilation: bool = True) -> nn.Module:
    if name in RESNETS:
        depth, stem = RESNETS[name]
        return resnet(depth, output_stride, multi_grid, pretrained, in_channels, stem,
                      contract_dilation)
    if not contract_dilation:
        raise ValueError(f"{name}: only the ResNets have the contract_dilation option")
    if name in ("vgg16", "vgg16_bn"):
        if multi_grid or in_channels != 3:
            raise ValueError(f"{name} supports neither multi_grid nor in_channels != 3")
        return vgg16(output_stride, pretrained, batch_norm=name == "vgg16_bn")
    elif name == "mobilenetv2":
        if multi_grid:
            raise ValueError("mobilenetv2 has no multi-grid option")
        return mobilenet_v2(output_stride, pretrained, in_channels)
    elif name == "xception65":
        return xception65(output_stride, pretrained, multi_grid, in_channels)
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")


def build_backbone(name: str, output_stride: int, pretrained: str | None,
                   multi_grid: Sequence[int] | None = None, in_channels: int = 3,
                   contract_dilation: bool = True) -> nn.Module:
    """Build a dense feature extractor.

    Args:
        name: one of ``BACKBONES``.
        output_stride: 8, 16 or 32 (strides beyond it become dilation).
        pretrained: path, URL, ``"imagenet"`` (torchvision's checkpoint; for the deep stems
            CSAIL's or OpenMMLab's, ``resnet.DEEP_STEM_URLS``) or ``None``.
        multi_grid: unit rates of the last stage (ResNet layer4, Xception's last block).
        in_channels: input channels (extra ones, e.g. depth, start at the RGB mean).
        contract_dilation: ResNets only: ``False`` dilates the first block of a dilated
            stage like the others (HANet's reference).
    """
    return _construct(name, output_stride, pretrained, multi_grid, in_channels,
                      contract_dilation).drop_classifier()


_GEOMETRY = {
    nn.Conv2d: ("stride", "padding", "dilation"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
}


def set_backbone_output_stride(backbone: nn.Module, name: str, output_stride: int,
                               multi_grid: Sequence[int] | None = None,
                               in_channels: int = 3,
                               contract_dilation: bool | None = None) -> None:
    """Re-dilate ``backbone`` (built by ``build_backbone(name, ...)``) in place.

    A parameter-free copy of the same backbone at ``output_stride`` is built on the meta
    device, and every convolution's and max-pool's stride/padding/dilation is copied from
    it, so the geometry is exactly what the constructor would give; parameters, buffers
    and the module tree are untouched. ``contract_dilation`` (ResNets): ``None`` keeps the
    backbone's, a bool sets it.
    """
    contract = contract_dilation
    if contract is None:
        contract = backbone.contract_dilation if isinstance(backbone, ResNet) else True
    with torch.device("meta"):
        reference = _construct(name, output_stride, None, multi_grid, in_channels, contract)
        reference.drop_classifier()
    ours = dict(backbone.named_modules())
    theirs = dict(reference.named_modules())
    if ours.keys() != theirs.keys():
        raise ValueError(f"backbone does not have the module tree of {name}")
    for key, module in ours.items():
        ref = theirs[key]
        if type(module) is not type(ref):
            raise ValueError(f"{key}: {type(module).__name__} is not {type(ref).__name__}")
        for attr in _GEOMETRY.get(type(module), ()):
            setattr(module, attr, getattr(ref, attr))
    for (key, p), (_, q) in zip(backbone.named_parameters(), reference.named_parameters()):
        if p.shape != q.shape:
            raise ValueError(f"{key}: shape {tuple(p.shape)} differs from {name}'s")
    backbone.output_stride = output_stride
    if isinstance(backbone, ResNet):
        backbone.contract_dilation = contract
