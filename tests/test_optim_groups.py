"""The learning rate and weight decay the optimizer applies to each kind of parameter, read
from the optimizer after the real schedule has run, against the formula of
segtrain/models/param_groups.py and the reference solvers' values."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from segtrain.app import build_model, build_optimizer, param_groups
from segtrain.errors import ConfigError
from segtrain.models.param_groups import ParamMults
from tests.conftest import compose_config

MAX_ITERS, STEP = 10, 3


def optimizer_at_step(overrides: list[str]):
    """Model, optimizer and config after ``STEP`` iterations of the configured schedule."""
    cfg = compose_config(["optim=sgd", "optim.momentum=0", "lr=poly",
                          f"trainer.max_iters={MAX_ITERS}", "dataset.num_classes=3", *overrides])
    model = build_model(cfg).double()  # float64: the probe below reads lr x wd ~ 1e-6
    opt = build_optimizer(cfg, param_groups(cfg, model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, instantiate(cfg.lr)(max_iters=MAX_ITERS))
    for _ in range(STEP):  # no gradients: the weights stay, the schedule advances
        opt.step()
        sched.step()
    return cfg, model, opt


def applied(opt: torch.optim.Optimizer, model: torch.nn.Module, p: torch.nn.Parameter):
    """(lr, weight decay) that one SGD step applies to ``p``, measured on the update itself:
    p = 0, grad 1 moves p by -lr; p = 1, grad 0 moves it by -lr * wd."""
    for q in model.parameters():
        q.grad = None
    with torch.no_grad():
        p.zero_()
    p.grad = torch.ones_like(p)
    opt.step()
    lr = -p.detach().flatten()[0].item()
    with torch.no_grad():
        p.fill_(1.0)
    p.grad = torch.zeros_like(p)
    opt.step()
    return lr, (1.0 - p.detach().flatten()[0].item()) / lr


def group_of(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> dict:
    (group,) = [g for g in opt.param_groups if any(q is p for q in g["params"])]
    return group


def check(cfg, model, opt, p, lr_mult: float, decay_mult: float) -> None:
    factor = (1 - STEP / MAX_ITERS) ** cfg.lr.power
    want = (cfg.optim.lr * factor * lr_mult, cfg.optim.weight_decay * decay_mult)
    group = group_of(opt, p)
    assert (group["lr"], group["weight_decay"]) == pytest.approx(want, rel=1e-6)
    assert applied(opt, model, p) == pytest.approx(want, rel=1e-6)


def test_deeplab_fine_tuning_rates_follow_the_prototxt_and_the_formula():
    """DeepLab v2 (ResNet) fine-tuning: backbone conv 1x with decay, BatchNorm scale not
    decayed, fc8 weight 10x with decay, fc8 bias 20x without (released prototxts)."""
    cfg, model, opt = optimizer_at_step(["model=deeplabv2_resnet18", "model.head_lr_mult=10",
                                         "model.head_bias_lr_mult=20"])
    mults = cfg.model.param_mults
    assert (mults.bias.lr, mults.bias.decay) == (2, 0)  # prototxt: bias lr_mult 2, decay 0
    fc8 = model.head.branches[0].classifier
    check(cfg, model, opt, model.backbone.conv1.weight, 1, 1)
    check(cfg, model, opt, model.backbone.bn1.weight, mults.norm_weight.lr,
          mults.norm_weight.decay)
    check(cfg, model, opt, model.backbone.bn1.bias, mults.norm_bias.lr, mults.norm_bias.decay)
    check(cfg, model, opt, fc8.weight, 10, 1)
    check(cfg, model, opt, fc8.bias, 20, mults.bias.decay)
    # BatchNorm is not decayed in the backbone either (the bug: backbone betas were)
    assert group_of(opt, model.backbone.bn1.bias)["weight_decay"] == 0.0


def test_segnet_basic_rates_follow_its_prototxt():
    """segnet_basic_train.prototxt: conv lr_mult 1 / 2, decay_mult 1 / 0; BN layers without
    a param spec, so Caffe's defaults (lr 1, decay 1) for scale and shift."""
    cfg, model, opt = optimizer_at_step(["model=segnet_basic", "model.depth=2",
                                         "model.channels=8"])
    conv, bn = model.encoders[0][0], model.encoders[0][1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    check(cfg, model, opt, conv.weight, 1, 1)
    check(cfg, model, opt, bn.weight, 1, 1)
    check(cfg, model, opt, bn.bias, 1, 1)
    check(cfg, model, opt, model.classifier.weight, 1, 1)
    check(cfg, model, opt, model.classifier.bias, 2, 0)  # (its convs feed BN: no bias)


def test_head_normalisation_follows_the_head_rate_and_the_norm_decay():
    cfg, model, opt = optimizer_at_step(["model=pspnet", "model.backbone=resnet18",
                                         "model.param_mults.norm_weight.decay=0",
                                         "model.param_mults.bias.lr=3"])
    head_bn = next(m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d))
    check(cfg, model, opt, head_bn.weight, cfg.model.head_lr_mult, 0)
    check(cfg, model, opt, model.backbone.bn1.weight, 1, 0)
    check(cfg, model, opt, model.backbone.bn1.bias, 1, 1)


def test_bad_param_mults_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"model.param_mults.bias must be \{lr, decay\}"):
        ParamMults.from_mapping({"bias": {"lr": 2}, "norm_weight": {"lr": 1, "decay": 0},
                                 "norm_bias": {"lr": 1, "decay": 0}})
