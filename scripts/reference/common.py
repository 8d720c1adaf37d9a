"""What the comparisons with the authors' code (``compare_*.py`` beside this file) share:
segtrain's config composed through its own ``conf/`` tree, parameter counts, and forward
hooks that keep a copy of intermediate outputs."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn

REPO = Path(__file__).resolve().parents[2]


def segtrain_config(overrides: list[str]) -> DictConfig:
    """The run config ``python -m segtrain <overrides>`` would compose."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def record_outputs(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks storing the output of each named submodule (a copy: the reference's
    in-place ReLUs would change it later); the store and the handles to remove."""
    store, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        def hook(_module, _inputs, output, name=name):
            store[name] = output.detach().clone()
        handles.append(modules[name].register_forward_hook(hook))
    return store, handles
