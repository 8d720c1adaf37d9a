"""The learning rate and weight decay the optimizer applies to each parameter, read from the
torch optimizer that training builds (``app.param_groups`` + ``app.build_optimizer``), against
the reference codes' values written out by hand per family, the formula of
segtrain/models/param_groups.py, and the groups every config had before the policy moved from
the models to ``optim.paramwise`` (tests/data/optimizer_groups.json)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain import config_schema
from segtrain.app import build_model, build_optimizer, param_groups
from segtrain.errors import ConfigError
from tests.conftest import CONF_DIR, REPO, compose_config

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


def built(overrides: list[str]):
    """The config, the model on the meta device and the optimizer training would build
    (shared by the tests below, which only read them)."""
    return _built(tuple(overrides))


@functools.cache
def _built(overrides: tuple[str, ...]):
    cfg = compose_config(list(overrides))
    if cfg.model.get("pretrained"):
        cfg.model.pretrained = None  # no download; roles do not depend on the weights
    with torch.device("meta"):
        model = build_model(cfg, 4 if cfg.dataset.get("use_depth") else 3)
    return cfg, model, build_optimizer(cfg, param_groups(cfg, model))


FROZEN = None  # a parameter the optimizer does not hold (frozen BatchNorm)
CAFFE_CONV = {"weight": (1, 1), "bias": (2, 0)}  # prototxt param specs, lr_mult / decay_mult
# Each family's reference, by hand: parameter -> (lr multiple, weight-decay multiple) of the
# base values; FROZEN: not trained.
REFERENCES = {
    # shelhamer/fcn.berkeleyvision.org voc-fcn8s/net.py: every conv, score layers included,
    # param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
    "experiment=fcn8s_voc": {
        "backbone.features.0.weight": (1, 1), "backbone.features.0.bias": (2, 0),
        "fc6.weight": (1, 1), "fc6.bias": (2, 0), "score_fr.weight": (1, 1),
        "score_fr.bias": (2, 0), "score_pool3.weight": (1, 1), "score_pool3.bias": (2, 0)},
    # DeepLab-LargeFOV train.prototxt: convs 1/1 and 2/0, fc8 lr_mult 10 / 20, decay 1 / 0
    "experiment=deeplabv1_voc": {
        "backbone.features.0.weight": (1, 1), "backbone.features.0.bias": (2, 0),
        "head.branches.0.layers.0.weight": (1, 1), "head.branches.0.layers.0.bias": (2, 0),
        "head.branches.0.layers.6.weight": (10, 1), "head.branches.0.layers.6.bias": (20, 0)},
    # DeepLab v2 VGG-16 ASPP prototxts: the same, fc8 of every branch 10 / 20
    "experiment=deeplabv2_aspp_ablation": {
        "backbone.features.28.bias": (2, 0), "head.branches.3.layers.3.weight": (1, 1),
        "head.branches.3.layers.6.weight": (10, 1), "head.branches.3.layers.6.bias": (20, 0)},
    # DeepLab v2 ResNet-101 train prototxt: convs without bias 1/1, BatchNorm and Scale
    # lr_mult 0 (frozen), fc8 (each ASPP branch) 10/1 and 20/0
    "experiment=deeplabv2_voc": {
        "backbone.conv1.weight": (1, 1), "backbone.bn1.weight": FROZEN,
        "backbone.bn1.bias": FROZEN, "backbone.layer4.2.conv3.weight": (1, 1),
        "head.branches.0.layers.0.weight": (10, 1), "head.branches.3.layers.0.bias": (20, 0)},
    # The default model, DeepLab v2 trained from scratch: its BatchNorm learns and, as in the
    # DeepLab v3 code, is not decayed (conf/optim/paramwise/deeplabv2.yaml); fc8 bias 2x
    "default": {
        "backbone.conv1.weight": (1, 1), "backbone.bn1.weight": (1, 0),
        "backbone.bn1.bias": (1, 0), "head.branches.0.layers.0.weight": (1, 1),
        "head.branches.0.layers.0.bias": (2, 0)},
    # tensorflow/models research/deeplab: slim weights_regularizer on conv weights only;
    # biases and batch_norm scale / shift without decay; every layer at the base rate
    "experiment=deeplabv3_voc": {
        "backbone.conv1.weight": (1, 1), "backbone.bn1.weight": (1, 0),
        "backbone.bn1.bias": (1, 0), "aspp.branches.0.0.weight": (1, 1),
        "aspp.branches.0.1.weight": (1, 0), "classifier.weight": (1, 1),
        "classifier.bias": (1, 0)},
    "experiment=deeplabv3plus_voc": {
        "backbone.conv1.weight": (1, 1), "backbone.bn1.bias": (1, 0),
        "decoder.0.0.weight": (1, 1), "decoder.0.1.weight": (1, 0),
        "classifier.weight": (1, 1), "classifier.bias": (1, 0)},
    # hszhao/semseg tool/train.py: modules_new (ppm, cls, aux) at base_lr * 10, one
    # SGD weight_decay for every parameter
    "experiment=pspnet_voc": {
        "backbone.conv1.weight": (1, 1), "backbone.bn1.weight": (1, 1),
        "backbone.bn1.bias": (1, 1), "ppm.stages.0.1.0.weight": (10, 1),
        "head.0.1.weight": (10, 1), "head.2.weight": (10, 1), "head.2.bias": (10, 1),
        "aux_head.2.bias": (10, 1)},
    "model=pspnet": {"backbone.conv1.weight": (1, 1), "head.2.bias": (10, 1)},
    # houqb/SPNet tool/train.py (on semseg): the backbone with its strip pooling at the base
    # rate; reduction, MPMs, head and aux head 10x; one weight decay
    "experiment=spnet_cityscapes": {
        "backbone.conv1.0.weight": (1, 1), "backbone.layer1.2.gate.conv_h.0.weight": (1, 1),
        "backbone.layer1.2.gate.conv_h.1.bias": (1, 1), "reduce.0.weight": (10, 1),
        "mpm.0.long_v.0.weight": (10, 1), "head.2.bias": (10, 1),
        "aux_head.2.weight": (10, 1)},
    # SegNet-Tutorial segnet_train.prototxt: convs 1/1 and 2/0; BN param specs: scale 1/1,
    # shift lr_mult 1 decay_mult 0; the decoder as the encoder
    "experiment=segnet_camvid": {
        "encoder.features.0.weight": (1, 1), "encoder.features.0.bias": (2, 0),
        "encoder.features.1.weight": (1, 1), "encoder.features.1.bias": (1, 0),
        "decoder.0.0.1.bias": (1, 0), "decoder.4.1.weight": (1, 1), "decoder.4.1.bias": (2, 0)},
    "model=segnet": {"encoder.features.1.bias": (1, 0), "decoder.4.1.bias": (2, 0)},
    # segnet_basic_train.prototxt: convs 1/1 and 2/0; BN layers state no param: Caffe's
    # default lr_mult 1, decay_mult 1
    "experiment=segnet_basic_camvid": {
        "encoders.0.0.weight": (1, 1), "encoders.0.1.weight": (1, 1),
        "encoders.0.1.bias": (1, 1), "classifier.weight": (1, 1), "classifier.bias": (2, 0)},
    # mmsegmentation config/cpnet_r50-d8.py without paramwise_cfg: one rate, one decay
    "experiment=cpnet_cityscapes": {
        "backbone.conv1.0.weight": (1, 1), "backbone.conv1.1.bias": (1, 1),
        "context_prior.aggregation.reduce.0.weight": (1, 1), "head.0.1.bias": (1, 1),
        "aux_head.2.bias": (1, 1)},
    # shachoi/HANet optimizer.py: one SGD over every parameter (--lr = --hanet_lr)
    "experiment=hanet_cityscapes": {
        "backbone.conv1.0.weight": (1, 1), "attention.layer1.conv1.0.weight": (1, 1),
        "attention.layer3.conv1.1.bias": (1, 1), "classifier.bias": (1, 1)},
    # DSRL's PyTorch DeepLab v3+ training: one optimizer weight decay over every parameter
    "experiment=dsrl_cityscapes": {
        "backbone.conv1.weight": (1, 1), "backbone.bn1.bias": (1, 1),
        "sisr.reduce.0.weight": (1, 1), "classifier.bias": (1, 1),
        "feature_transform.bias": (1, 1)},
    # U-Net: the paper states no per-layer rates or decay
    "model=unet": {"encoders.0.0.weight": (1, 1), "encoders.0.0.bias": (1, 1),
                   "classifier.bias": (1, 1)},
}


def overrides_of(case: str) -> list[str]:
    if case == "default":
        return []
    return [case, "++dataset.root=unused"] if case.startswith("experiment=") else [case]


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_each_family_trains_each_role_as_its_reference(case):
    cfg, model, opt = built(overrides_of(case))
    for name, want in REFERENCES[case].items():
        p = model.get_parameter(name)
        holding = [g for g in opt.param_groups if any(q is p for q in g["params"])]
        if want is FROZEN:
            assert not holding and not p.requires_grad, f"{case}: {name} is trained"
            continue
        (group,) = holding
        got = (group["lr"] / cfg.optim.lr, group["weight_decay"] / cfg.optim.weight_decay)
        assert got == pytest.approx(want), f"{case}: {name}"


def table(cfg, opt) -> list[list]:
    """(parameters, lr multiple, decay multiple) of each group, sorted; the decay multiple is
    null where the base weight decay is 0."""
    lr, wd = float(cfg.optim.lr), float(cfg.optim.weight_decay)
    rows = [[sum(p.numel() for p in g["params"]), round(g["lr"] / lr, 9),
             None if wd == 0 else round(g["weight_decay"] / wd, 9)] for g in opt.param_groups]
    return sorted(rows, key=lambda r: (r[0], r[1], -1 if r[2] is None else r[2]))


BEFORE = json.loads((REPO / "tests" / "data" / "optimizer_groups.json").read_text())
CASES = ["default"] + [f"{group}={p.stem}" for group in ("model", "experiment")
                       for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_every_config_is_recorded():
    assert sorted(BEFORE) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_every_config_keeps_the_groups_it_had_before_the_paramwise_policy(case):
    """tests/data/optimizer_groups.json was written by this function's table on main 4b3b464,
    when the multipliers lived on the models and in model.param_mults."""
    cfg, _, opt = built(overrides_of(case))
    assert table(cfg, opt) == BEFORE[case]


def test_a_bias_override_reaches_the_head_biases_too():
    """optim.paramwise.bias_lr_mult applies to every bias: a head bias learns at head x bias.
    (Before, model.param_mults.bias.lr=1 left DeepLab's fc8 bias at 2x.)"""
    for extra, fc8_bias in (([], 1.0), (["experiment=deeplabv1_voc", "++dataset.root=x"], 10.0)):
        cfg, model, opt = built([*extra, "optim.paramwise.bias_lr_mult=1"])
        fc8 = model.head.branches[0].classifier
        assert group_of(opt, fc8.bias)["lr"] == pytest.approx(fc8_bias * cfg.optim.lr)
        assert group_of(opt, fc8.weight)["lr"] == pytest.approx(fc8_bias * cfg.optim.lr)
        backbone_bias = next(m for m in model.backbone.modules()
                             if isinstance(m, torch.nn.Conv2d) and m.bias is not None).bias \
            if extra else None
        if backbone_bias is not None:
            assert group_of(opt, backbone_bias)["lr"] == pytest.approx(cfg.optim.lr)


def test_the_policy_is_chosen_on_the_command_line_over_the_models():
    cfg, model, opt = built(["model=segnet", "optim/paramwise=torch"])
    assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == \
        {(cfg.optim.lr, cfg.optim.weight_decay)}
    cfg, model, opt = built(["model=pspnet", "optim/paramwise=tf"])  # tf: head at 1x
    assert group_of(opt, model.head[2].weight)["lr"] == cfg.optim.lr
    assert group_of(opt, model.head[2].bias)["weight_decay"] == 0


def test_deeplab_fine_tuning_rates_follow_the_prototxt_and_the_formula():
    """DeepLab v2 (ResNet) fine-tuning: backbone conv 1x with decay, BatchNorm scale not
    decayed, fc8 weight 10x with decay, fc8 bias 20x without (released prototxts)."""
    cfg, model, opt = optimizer_at_step(["model=deeplabv2_resnet18",
                                         "optim.paramwise.head_lr_mult=10"])
    fc8 = model.head.branches[0].classifier
    check(cfg, model, opt, model.backbone.conv1.weight, 1, 1)
    check(cfg, model, opt, model.backbone.bn1.weight, 1, 0)
    check(cfg, model, opt, model.backbone.bn1.bias, 1, 0)
    check(cfg, model, opt, fc8.weight, 10, 1)
    check(cfg, model, opt, fc8.bias, 20, 0)  # prototxt: fc8 bias lr_mult 20, decay_mult 0
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
                                         "optim.paramwise.norm_weight_decay_mult=0",
                                         "optim.paramwise.norm_lr_mult=0.5",
                                         "optim.paramwise.bias_lr_mult=3"])
    head_bn = next(m for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d))
    check(cfg, model, opt, head_bn.weight, 10 * 0.5, 0)  # semseg: new layers 10x
    check(cfg, model, opt, head_bn.bias, 10 * 0.5, 1)
    check(cfg, model, opt, model.head[2].bias, 10 * 3, 1)
    check(cfg, model, opt, model.backbone.bn1.weight, 0.5, 0)
    check(cfg, model, opt, model.backbone.bn1.bias, 0.5, 1)


@pytest.mark.parametrize("key", ["bias_lr_mult=-1", "head_lr_mult=abc"])
def test_bad_paramwise_value_is_a_one_line_error(key):
    cfg = compose_config([f"optim.paramwise.{key}"])
    with pytest.raises(ConfigError, match=rf"optim.paramwise.{key.split('=')[0]}="):
        config_schema.check(cfg)


def test_a_run_saved_before_the_paramwise_policy_still_builds_its_model():
    """Run folders are the user's data: a config saved when the multipliers lived on the
    model (main 4b3b464: model.head_lr_mult, head_bias_lr_mult, param_mults) still gives the
    network evaluation and prediction load the checkpoint into."""
    cfg = compose_config(["dataset.num_classes=3"])
    saved = OmegaConf.merge(OmegaConf.to_container(cfg), {"model": {
        "head_lr_mult": 1, "head_bias_lr_mult": 2,
        "param_mults": {"bias": {"lr": 2, "decay": 0}, "norm_weight": {"lr": 1, "decay": 0},
                        "norm_bias": {"lr": 1, "decay": 0}}}})
    with torch.device("meta"):
        old, new = build_model(saved), build_model(cfg)
    assert [(k, v.shape) for k, v in old.state_dict().items()] == \
        [(k, v.shape) for k, v in new.state_dict().items()]
