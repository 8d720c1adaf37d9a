"""Poly and step schedules against their closed forms (DeepLab v2 Sec. 4.1)."""

import pytest
import torch

from segtrain.engine.schedules import build_scheduler, poly, step


@pytest.mark.parametrize("it", [0, 1, 17, 500, 999, 1000])
def test_poly_closed_form(it):
    assert poly(1000, 0.9)(it) == pytest.approx((1 - it / 1000) ** 0.9)


def test_step_closed_form_with_fractions_and_iterations():
    f = step(1000, [0.6, 0.85], 0.1)
    assert [f(i) for i in (0, 599, 600, 849, 850, 999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    g = step(1000, [100, 300], 0.5)
    assert [g(99), g(100), g(300)] == pytest.approx([1, 0.5, 0.25])


def test_linear_warmup_multiplies_the_schedule():
    f = poly(100, 0.9, warmup_iters=10, warmup_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx((0.1 + 0.9 * 0.5) * (1 - 0.05) ** 0.9)
    assert f(10) == pytest.approx((1 - 0.1) ** 0.9)


def test_scheduler_keeps_group_multipliers():
    w = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.01}, {"params": [b], "lr": 0.1}], lr=0.01)
    sched = build_scheduler(opt, poly(10, 0.9))
    for _ in range(4):
        opt.step()
        sched.step()
    expected = (1 - 4 / 10) ** 0.9
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * expected)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * expected)
