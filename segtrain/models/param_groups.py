"""Optimizer parameter groups: a model's parameters by role and kind, with the multipliers
of an optimizer policy (``optim.paramwise``, conf/optim/paramwise/), as mmsegmentation's
``paramwise_cfg`` (``bias_lr_mult``, ``bias_decay_mult``, ``norm_decay_mult``) keeps them in
the optimizer's config, never on the model.

A model states the role of each parameter through the contract
(``SegmentationModel.head_modules``): ``head``, the layers a reference trains at its
new-layer rate (DeepLab's fc8, PSPNet's pyramid pooling and classifiers), or ``backbone``,
every other parameter. The kind follows from the module and the name: ``norm_weight`` and
``norm_bias`` for the affine parameters of a normalisation layer (``NORM_TYPES``), ``bias``
for any other parameter named ``bias``, ``weight`` for the rest. For a parameter of kind k in
role r the optimizer applies

    lr = optim.lr x schedule(it) x role(r) x kind_lr(k)       wd = optim.weight_decay x decay(k)

with role(backbone) = 1, role(head) = ``head_lr_mult``; kind_lr(weight) = 1,
kind_lr(bias) = ``bias_lr_mult``, kind_lr(norm_*) = ``norm_lr_mult``; decay(weight) = 1,
decay(bias) = ``bias_decay_mult``, decay(norm_weight) = ``norm_weight_decay_mult``,
decay(norm_bias) = ``norm_bias_decay_mult``. A head bias learns at head x bias (DeepLab's
fc8: 10 x 2 = 20, the released prototxts' ``lr_mult: 20``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from torch import nn

#: the modules whose affine parameters are "normalisation" parameters
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)

#: the roles, in the order of their groups
ROLES = ("backbone", "head")
#: the kinds, in the order of their groups within a role
KINDS = ("weight", "bias", "norm_weight", "norm_bias")


@dataclass(frozen=True)
class Paramwise:
    """``optim.paramwise``: the multipliers of the base learning rate and weight decay by
    role and kind (module docstring); the config schema checks the values."""

    head_lr_mult: float
    bias_lr_mult: float
    bias_decay_mult: float
    norm_lr_mult: float
    norm_weight_decay_mult: float
    norm_bias_decay_mult: float

    @classmethod
    def from_mapping(cls, node: Mapping) -> Paramwise:
        return cls(**{f.name: float(node[f.name]) for f in fields(cls)})

    def lr_mult(self, role: str, kind: str) -> float:
        role_mult = self.head_lr_mult if role == "head" else 1.0
        kind_mult = {"weight": 1.0, "bias": self.bias_lr_mult}.get(kind, self.norm_lr_mult)
        return role_mult * kind_mult

    def decay_mult(self, kind: str) -> float:
        return {"weight": 1.0, "bias": self.bias_decay_mult,
                "norm_weight": self.norm_weight_decay_mult,
                "norm_bias": self.norm_bias_decay_mult}[kind]


def _by_kind(modules: Iterable[nn.Module], seen: set[int]) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters of ``modules`` (not yet in ``seen``) by kind, in module order."""
    kinds: dict[str, list[nn.Parameter]] = {kind: [] for kind in KINDS}
    for module in modules:
        for sub in module.modules():
            norm = isinstance(sub, NORM_TYPES)
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                kind = "bias" if name == "bias" else "weight"
                kinds[f"norm_{kind}" if norm else kind].append(p)
    return kinds


def optimizer_groups(model: nn.Module, head: Iterable[nn.Module],
                     policy: Paramwise) -> list[dict]:
    """One group per non-empty (role, kind): ``backbone``, ``backbone_bias``,
    ``backbone_norm_weight``, ``backbone_norm_bias``, then the same for ``head``, each with
    its ``lr_mult`` and ``weight_decay_mult`` under ``policy``. ``head``: the model's
    ``head_modules()``; every other trainable parameter of ``model`` is ``backbone`` (named
    ``all`` when the model has no head); frozen parameters are left out."""
    seen: set[int] = set()
    new = _by_kind(head, seen)
    roles = {"backbone": _by_kind([model], seen), "head": new}
    has_head = any(new.values())

    def name(role: str, kind: str) -> str:
        prefix = role if has_head else "all"
        return prefix if kind == "weight" else f"{prefix}_{kind}"

    return [{"name": name(role, kind), "params": params, "lr_mult": policy.lr_mult(role, kind),
             "weight_decay_mult": policy.decay_mult(kind)}
            for role in ROLES for kind, params in roles[role].items() if params]
