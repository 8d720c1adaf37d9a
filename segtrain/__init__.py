"""segtrain: config-driven training and evaluation of semantic-segmentation networks.

The Python API: ``from segtrain import load_run`` (``segtrain/api.py``).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Segmenter", "load_run"]


def __getattr__(name: str) -> Any:
    # imported on first use: ``python -m segtrain`` and ``import segtrain.errors`` need not
    # load the models, Hydra and the API
    if name in __all__:
        from segtrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'segtrain' has no attribute {name!r}")
