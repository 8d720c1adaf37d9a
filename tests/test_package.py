"""The package as a user gets it: models, losses, datasets and evaluation import without
Hydra; ``UserError`` is segtrain's own; the repository names no path outside itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segtrain.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["segtrain.models", "segtrain.losses", "segtrain.data", "segtrain.eval"]


def test_models_losses_data_and_eval_import_without_hydra():
    code = (
        "import importlib, pkgutil, sys\n"
        f"for pkg in {LIBRARY!r}:\n"
        "    path = importlib.import_module(pkg).__path__\n"
        "    for m in pkgutil.walk_packages(path, pkg + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'hydra', 'omegaconf'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_user_error_is_segtrains_own_exception():
    # no Hydra class among its bases: catching it needs nothing but segtrain
    for cls in (UserError, ConfigError):
        assert all(not base.__module__.startswith("hydra") for base in cls.__mro__), cls.__mro__
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(UserError, match="trainer.precision"):
        raise ConfigError("trainer.precision=fp8: expected one of fp32, bf16, fp16")
