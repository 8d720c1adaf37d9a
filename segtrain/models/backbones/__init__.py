"""Backbones. ResNet, VGG and MobileNetV2 have torchvision-identical state_dict keys (their
ImageNet checkpoints load strictly); Aligned Xception-65 has no torchvision checkpoint.

Every backbone has ``forward_features(x) -> dict`` with the keys ``c2, c3, c4, c5``
(nominal strides 4, 8, 16, 32; the real stride follows ``output_stride``) and the
attribute ``feature_channels`` giving each key's channel count.
"""
