"""An exponential moving average of a network's weights (``trainer.ema.decay``).

After every optimizer step t (Polyak and Juditsky 1992, exponential form; the formula of
``torch.optim.swa_utils.get_ema_multi_avg_fn``)::

    W_1^ema = W_1                                   (the weights after the first step)
    W_t^ema = decay * W_{t-1}^ema + (1 - decay) * W_t

Parameters go through ``torch.optim.swa_utils.AveragedModel`` with that function. Its
``use_buffers=True`` would also push the integer ``num_batches_tracked`` of BatchNorm through
``decay * a + (1 - decay) * b`` and truncate it back to an integer (it stays stuck at its
first value), so buffers are handled here: floating ones (BatchNorm running mean and
variance) get the same average as the weights (as timm's ModelEmaV3 and mmengine's
ExponentialMovingAverage with buffers do: the averaged network is evaluated with averaged
statistics, no extra pass over the data), integer ones are copied from the live network
(what ``AveragedModel`` does to every buffer with ``use_buffers=False``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from segtrain.errors import ConfigError


class WeightEMA:
    """The averaged copy of ``model`` (on its device); ``module`` is the network to evaluate.

    Args:
        model: the bare network (not DDP-wrapped) being trained.
        decay: in [0, 1); 0.999 averages over roughly the last 1000 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"trainer.ema.decay={decay}: expected a number in [0, 1) or null")
        self.decay = float(decay)
        self._average = get_ema_multi_avg_fn(self.decay)
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=False)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def updates(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in ``model``'s weights after an optimizer step (the first one copies)."""
        floats = {i for i, b in enumerate(self.module.buffers()) if b.is_floating_point()}
        before = [b.clone() for i, b in enumerate(self.module.buffers()) if i in floats] \
            if self.updates > 0 else []
        # parameters averaged; every buffer copied from model (use_buffers=False); n += 1
        self.averaged.update_parameters(model)
        if before:  # floating buffers: the average of what they held and model's
            live = [b.detach() for i, b in enumerate(model.buffers()) if i in floats]
            self._average(before, live, None)
            mine = [b for i, b in enumerate(self.module.buffers()) if i in floats]
            torch._foreach_copy_(mine, before)

    def state_dict(self) -> dict[str, Any]:
        """``{"model": the averaged weights (the network's own keys), "updates", "decay"}``:
        loads into the network as a checkpoint's ``model`` does."""
        return {"model": self.module.state_dict(), "updates": self.updates,
                "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.averaged.n_averaged.fill_(int(state["updates"]))
