"""Per-group learning rates: pretrained backbone at 1x, new layers at a multiple.

DeepLab's protocol (Chen et al., TPAMI 2017, Sec. 4; the released Caffe prototxts): new
layers learn at 10x the base rate for weights and 20x for biases, biases without weight
decay. The optimizer builder multiplies the base rate by each group's ``lr_mult`` and the
base weight decay by its ``weight_decay_mult``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _split_bias(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    weights, biases = [], []
    seen: set[int] = set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (biases if name.endswith("bias") else weights).append(p)
    return weights, biases


def backbone_head_groups(backbone: nn.Module | Iterable[nn.Module],
                         head: nn.Module | Iterable[nn.Module],
                         head_lr_mult: float = 10.0,
                         head_bias_lr_mult: float = 20.0) -> list[dict]:
    """Groups for the optimizer: backbone weights/biases 1x, head weights/biases at the mults.

    Empty groups are dropped; frozen parameters (``requires_grad=False``) are left out.
    """
    backbone = [backbone] if isinstance(backbone, nn.Module) else list(backbone)
    head = [head] if isinstance(head, nn.Module) else list(head)
    bw, bb = _split_bias(backbone)
    hw, hb = _split_bias(head)
    groups = [
        {"name": "backbone", "params": bw, "lr_mult": 1.0, "weight_decay_mult": 1.0},
        {"name": "backbone_bias", "params": bb, "lr_mult": 1.0, "weight_decay_mult": 1.0},
        {"name": "head", "params": hw, "lr_mult": head_lr_mult, "weight_decay_mult": 1.0},
        {"name": "head_bias", "params": hb, "lr_mult": head_bias_lr_mult,
         "weight_decay_mult": 0.0},
    ]
    return [g for g in groups if g["params"]]


def single_group(model: nn.Module) -> list[dict]:
    """All parameters at the base rate (networks trained from scratch, e.g. U-Net)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"name": "all", "params": params, "lr_mult": 1.0, "weight_decay_mult": 1.0}]


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep BatchNorm statistics and affine parameters fixed (DeepLab v2 trains this way).

    Call after ``model.train()``; the trainer does so through ``model.train()`` overrides.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
