"""Optimizer parameter groups: a role multiplier (pretrained backbone vs new layers) times a
kind multiplier (weight, bias, normalisation scale, normalisation shift), for the learning
rate and the weight decay, as the reference solvers set them per layer and mmsegmentation's
``paramwise_cfg`` (``bias_lr_mult``, ``bias_decay_mult``, ``norm_decay_mult``) does.

For a parameter of kind k in role r the optimizer applies

    lr = optim.lr x schedule(it) x role_lr(r, k)        wd = optim.weight_decay x decay(k)

with role_lr = 1 for weights of the backbone (or of a network without one), the kind's
``lr`` for its biases and normalisation parameters; in the head (new layers) weights and
normalisation parameters are scaled by ``head_lr_mult`` and biases learn at
``head_bias_lr_mult``, the fc8 bias multiple a prototxt states (DeepLab: 20 = 10 x 2). The
kinds' values live in each model's config (``model.param_mults``); the optimizer builder
multiplies the base rate by each group's ``lr_mult`` and the base decay by its
``weight_decay_mult``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from segtrain.errors import ConfigError

#: the modules whose affine parameters are "normalisation" parameters
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)

KINDS = ("bias", "norm_weight", "norm_bias")


@dataclass(frozen=True)
class KindMult:
    """Multipliers of the base learning rate and weight decay for one parameter kind."""

    lr: float
    decay: float


@dataclass(frozen=True)
class ParamMults:
    """``model.param_mults``: the kinds' multipliers (weights are 1 and 1 by definition)."""

    bias: KindMult
    norm_weight: KindMult
    norm_bias: KindMult

    @classmethod
    def from_mapping(cls, node: Mapping | None) -> ParamMults:
        """``{bias: {lr, decay}, norm_weight: {lr, decay}, norm_bias: {lr, decay}}``."""
        expected = "{bias: {lr, decay}, norm_weight: {lr, decay}, norm_bias: {lr, decay}}"
        if not isinstance(node, Mapping) or set(node) != set(KINDS):
            raise ConfigError(f"model.param_mults must be {expected}, got {node!r}")
        kinds = {}
        for kind in KINDS:
            entry = node[kind]
            if not isinstance(entry, Mapping) or set(entry) != {"lr", "decay"}:
                raise ConfigError(f"model.param_mults.{kind} must be {{lr, decay}}, got {entry!r}")
            lr, decay = float(entry["lr"]), float(entry["decay"])
            if lr < 0 or decay < 0:
                raise ConfigError(f"model.param_mults.{kind} must be non-negative, got {entry!r}")
            kinds[kind] = KindMult(lr, decay)
        return cls(**kinds)


#: no kind multipliers: every parameter at its role's rate and the base decay (PyTorch's plain
#: optimizer); the training app always passes the model config's values instead
UNIFORM = ParamMults(KindMult(1.0, 1.0), KindMult(1.0, 1.0), KindMult(1.0, 1.0))


def _by_kind(modules: Iterable[nn.Module], seen: set[int]) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters of ``modules`` (not yet in ``seen``) by kind."""
    kinds: dict[str, list[nn.Parameter]] = {"weight": [], "bias": [], "norm_weight": [],
                                            "norm_bias": []}
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


def _role_groups(role: str, kinds: dict[str, list[nn.Parameter]], lr_mult: float,
                 bias_lr_mult: float, mults: ParamMults) -> list[dict]:
    spec = {"weight": (role, lr_mult, 1.0),
            "bias": (f"{role}_bias", bias_lr_mult, mults.bias.decay),
            "norm_weight": (f"{role}_norm_weight", lr_mult * mults.norm_weight.lr,
                            mults.norm_weight.decay),
            "norm_bias": (f"{role}_norm_bias", lr_mult * mults.norm_bias.lr,
                          mults.norm_bias.decay)}
    return [{"name": name, "params": kinds[kind], "lr_mult": lr, "weight_decay_mult": wd}
            for kind, (name, lr, wd) in spec.items() if kinds[kind]]


def _modules(m: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [m] if isinstance(m, nn.Module) else list(m)


def backbone_head_groups(backbone: nn.Module | Iterable[nn.Module],
                         head: nn.Module | Iterable[nn.Module],
                         head_lr_mult: float, head_bias_lr_mult: float,
                         mults: ParamMults | None = None) -> list[dict]:
    """Groups ``backbone``, ``backbone_bias``, ``backbone_norm_weight``, ``backbone_norm_bias``
    and the same for ``head`` (module docstring for their rates and decays; ``mults=None`` is
    ``UNIFORM``). Empty groups are dropped; frozen parameters are left out."""
    mults = mults or UNIFORM
    seen: set[int] = set()
    back = _by_kind(_modules(backbone), seen)
    new = _by_kind(_modules(head), seen)
    return (_role_groups("backbone", back, 1.0, mults.bias.lr, mults)
            + _role_groups("head", new, head_lr_mult, head_bias_lr_mult, mults))


def single_group(model: nn.Module, mults: ParamMults | None = None) -> list[dict]:
    """One role (``all``) at the base rate, split by kind: networks without a pretrained
    backbone (U-Net, SegNet-Basic) or trained at one rate (FCN)."""
    mults = mults or UNIFORM
    return _role_groups("all", _by_kind([model], set()), 1.0, mults.bias.lr, mults)
