"""The trainer's sync-free bookkeeping: loss terms summed on the device and read as means,
the fused weights-finite check, and the non-finite step remembered on the device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from segtrain.engine.trainer import NonFiniteLossError, Trainer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.register_buffer("scale16", torch.ones(3, dtype=torch.float16))

    def forward(self, x):
        return {"out": self.bn(self.conv(x))}


def _trainer(tmp_path, model=None) -> Trainer:
    model = model or Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, lambda o, b: {"total": o["out"].mean()}, opt, lambda it: 1.0,
                   lambda start: iter([]), tmp_path, max_iters=4, iter_size=1,
                   precision="fp32", clip_grad_norm=None, log_interval=2, seed=0,
                   device=torch.device("cpu"))


@pytest.mark.parametrize("where", ["conv.weight", "bn.running_var", "scale16"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_weights_finite_finds_one_bad_value_anywhere(tmp_path, where, value):
    trainer = _trainer(tmp_path)
    assert trainer._weights_finite()
    tensor = dict(trainer.model.state_dict())[where]
    tensor.view(-1)[-1] = value
    assert not trainer._weights_finite()


def test_large_finite_weights_are_finite(tmp_path):
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        trainer.model.conv.weight.fill_(3e38)  # its L2 norm would overflow float32
    assert trainer._weights_finite()


def test_terms_are_means_over_the_interval_and_a_bad_step_is_remembered(tmp_path):
    trainer = _trainer(tmp_path)
    trainer._sums = {}
    trainer._bad_iter = torch.full((), -1, dtype=torch.long)
    batch = {"image": torch.randn(1, 3, 4, 4), "mask": torch.zeros(1, 4, 4, dtype=torch.long)}
    losses = []
    trainer.loss_fn = lambda o, b: {"total": o["out"].mean(), "x": torch.tensor(2.0)}
    original = trainer.loss_fn
    trainer.loss_fn = lambda o, b: losses.append(original(o, b)) or losses[-1]
    for _ in range(3):
        trainer._step(iter([dict(batch)]))
        trainer.iteration += 1
    terms = trainer._read_terms(3)
    assert terms["x"] == pytest.approx(2.0)
    assert terms["total"] == pytest.approx(sum(float(t["total"].detach()) for t in losses) / 3)
    assert trainer._sums == {} and int(trainer._bad_iter) == -1
    # a NaN loss at the step of iteration 3 is remembered, not raised, until the check
    trainer.loss_fn = lambda o, b: {"total": o["out"].mean() * math.nan}
    trainer._step(iter([dict(batch)]))
    trainer.iteration += 1
    assert int(trainer._bad_iter) == 3
    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 4"):
        trainer._check_finite(weights=False)
