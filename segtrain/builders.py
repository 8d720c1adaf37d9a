"""What training (``segtrain.app``) and every route into a saved run (``segtrain.runs``) build
from a config node alike: ``instantiate`` (Hydra's, letting a constructor's ``UserError``
through) and the network of ``cfg.model``. Below ``runs`` and ``app``, above the packages
that never see Hydra (core, data, models, losses, eval)."""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from segtrain.errors import ConfigError, UserError
from segtrain.models.base import SegmentationModel
from segtrain.models.init_from import init_from


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, letting a ``UserError`` of the constructor through as it
    is (Hydra would wrap it in a three-line 'Error in call to target' message)."""
    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def build_model(cfg: DictConfig, in_channels: int = 3, initialise: bool = False,
                **overrides: Any) -> torch.nn.Module:
    """``cfg.model``; a dataset with extra input channels (RGB-D) widens the first layer.

    ``model.msc.train_scales`` (set for every model in conf/config.yaml, null = off) wraps
    the network in ``MultiScaleInputs`` (DeepLab v2's multi-scale inputs, max fusion).
    ``initialise``: apply ``model.init_from`` (a run folder or .pt; null = off, the default
    of conf/config.yaml; run folders saved before that key existed lack it), copying the
    matching weights of that checkpoint into the network (FCN's staged training, 32s -> 16s
    -> 8s); training does, evaluation and prediction load the run's own checkpoint instead.
    """
    if in_channels != 3:
        overrides["in_channels"] = in_channels
    node = OmegaConf.to_container(cfg.model, resolve=True)
    msc = node.pop("msc", None) or {}
    source = node.pop("init_from", None)
    bn_momentum = node.pop("bn_momentum", None)
    node.pop("param_mults", None)  # the optimizer's (param_mults below), not the network's
    model = instantiate(node, **overrides)
    if not isinstance(model, SegmentationModel):
        raise ConfigError(f"model._target_={node['_target_']} is not a "
                          f"segtrain.models.base.SegmentationModel (the model contract)")
    if bn_momentum is not None:
        set_bn_momentum(model, float(bn_momentum))
    if initialise and source not in (None, ""):
        init_from(model, source)
    scales = msc.get("train_scales")
    if scales is not None:
        from segtrain.models.msc import MultiScaleInputs

        model = MultiScaleInputs(model, list(scales))
    return model


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> None:
    """``model.bn_momentum``: the running-statistics momentum of every BatchNorm layer."""
    if not 0.0 < momentum <= 1.0:
        raise ConfigError(f"model.bn_momentum={momentum}: expected a value in (0, 1] "
                          f"(PyTorch's convention: 1 - TensorFlow's decay)")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
