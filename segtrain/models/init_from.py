"""Initialise a model from another trained model's checkpoint (``model.init_from``).

FCN's staged training (Long et al., CVPR 2015, Sec. 4.2; the reference
``voc-fcn16s/solve.py`` copies ``fcn32s-heavy-88k.caffemodel`` into the FCN-16s net):
FCN-16s starts from a trained FCN-32s and FCN-8s from a trained FCN-16s. Every parameter
and buffer whose name and shape match is copied; the layers the new net adds (the skip
score layers ``score_pool4`` / ``score_pool3``, zero-initialised by the model itself, and
the new 2x upsampler, bilinear) keep their initialisation, so at the first step the new
net predicts what the old one did up to the upsampling path. Works for any model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from segtrain.core import checkpoint

log = logging.getLogger("segtrain")


@dataclass
class InitReport:
    """What ``init_from`` did: names copied, kept (not in the checkpoint), ignored."""

    source: Path
    copied: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)        # in the model, not in the checkpoint
    unused: list[str] = field(default_factory=list)     # in the checkpoint, not in the model
    mismatched: list[str] = field(default_factory=list)  # same name, different shape

    def summary(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "") if keys else "none"

        return (f"init_from {self.source}: copied {len(self.copied)} tensors; kept the "
                f"model's own initialisation for {len(self.new)} new ({names(self.new)}) and "
                f"{len(self.mismatched)} of another shape ({names(self.mismatched)}); "
                f"{len(self.unused)} checkpoint tensors unused ({names(self.unused)})")


def init_from(model: nn.Module, source: str | Path) -> InitReport:
    """Copy every tensor of ``source``'s ``"model"`` state that matches ``model`` by name
    and shape. ``source`` is a run folder (its ``checkpoints/last.pt``) or a ``.pt`` file
    written by the trainer. Raises ``CheckpointError`` when nothing matches.
    """
    path = checkpoint.resolve(source)
    state = checkpoint.load(path)["model"]
    own = model.state_dict()
    report = InitReport(path)
    update = {}
    for key, value in own.items():
        if key not in state:
            report.new.append(key)
        elif tuple(state[key].shape) != tuple(value.shape):
            report.mismatched.append(key)
        else:
            update[key] = state[key]
            report.copied.append(key)
    report.unused = [k for k in state if k not in own]
    if not update:
        raise checkpoint.CheckpointError(
            f"model.init_from={source}: no tensor of {path} matches the model by name and "
            f"shape (expected a checkpoint of a related model, e.g. FCN-32s for FCN-16s)")
    with torch.no_grad():
        model.load_state_dict(update, strict=False)
    log.info("%s", report.summary())
    return report
