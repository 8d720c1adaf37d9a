"""Poly and step schedules against their closed forms (DeepLab v2 Sec. 4.1)."""

import pytest
import torch

from segtrain.app import train
from segtrain.engine.schedules import poly, step


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


def test_the_trainer_sets_each_groups_rate_at_each_step(tiny_cfg, tmp_path, monkeypatch):
    """The rates SGD really applies in a run: base x group multiplier x warm-up x poly, per
    parameter group and iteration (DeepLab v2 Sec. 4.1; fc8 biases 20x as in its prototxt)."""
    seen = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        seen.append({g["name"]: (g["lr"], g["params"]) for g in self.param_groups})
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    cfg = tiny_cfg("optim=sgd", "optim.lr=0.01", "optim.paramwise.head_lr_mult=10",
                   "lr.warmup_iters=2", "lr.warmup_ratio=0.1",
                   "trainer.max_iters=5", "trainer.eval_interval=5", "trainer.global_batch_size=1",
                   "dataset.image_size=16", "dataset.val.num_samples=1")
    train(cfg, tmp_path)
    # the start's disk estimate steps a one-group copy of each group on a 2-element proxy
    # (engine/checkpoint_files.py): the run's own steps are those with every group
    seen = [groups for groups in seen if len(groups) > 1]
    assert len(seen) == 5
    mults = {"backbone": 1, "backbone_norm_weight": 1, "backbone_norm_bias": 1, "head": 10,
             "head_bias": 20}
    for it, groups in enumerate(seen):
        warmup = 0.1 + 0.9 * it / 2 if it < 2 else 1.0
        factor = warmup * (1 - it / 5) ** 0.9
        assert set(groups) == set(mults)
        for name, (lr, _) in groups.items():
            assert lr == pytest.approx(0.01 * mults[name] * factor, rel=1e-9), (it, name)
    # the 20x group holds the classifier biases: one per class in each ASPP branch
    assert {tuple(p.shape) for p in seen[0]["head_bias"][1]} == {(cfg.dataset.num_classes,)}
