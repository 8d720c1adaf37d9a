"""Every experiment starts: each conf/experiment/*.yaml, composed with its own settings (model,
loss, optimizer, schedule, multi-scale inputs), builds its model and takes one training step
on a tiny batch with its dataset's channels and classes, with ImageNet weights off (no
download here). DeepLab v3+ on VOC defaults to a backbone whose ImageNet weights exist
(ResNet-101, the paper's Table 3 rows), and asking for Xception-65 ImageNet weights is a
one-line error naming what to provide."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain import app
from segtrain.errors import ConfigError
from segtrain.models.backbones import pretrained as pretrained_module
from tests.conftest import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SIZE = 64  # input side of the tiny batch; CPNet's prior grid is scaled to it (stride 8)
# ResNet-101 / VGG-16 paper models: several seconds per step on two cores
SLOW = {"cpnet_cityscapes", "deeplabv2_voc", "deeplabv3_voc", "deeplabv3plus_voc",
        "dsrl_cityscapes", "fcn8s_voc", "fcn16s_voc", "fcn32s_voc", "hanet_cityscapes",
        "pspnet_cityscapes", "pspnet_voc", "spnet_cityscapes", "deeplabv2_resnet_ablation",
        "deeplabv2_aspp_ablation", "deeplabv1_voc"}


def experiment_config(name: str, tmp_path):
    # ++: experiments on the embedded dataset (unet) have no root to set
    cfg = compose_config([f"experiment={name}", f"++dataset.root={tmp_path}"])
    if "pretrained" in cfg.model:
        cfg.model.pretrained = None
    if cfg.model.get("prior_size") is not None:  # CPNet: the prior grid is the stride-8 map
        cfg.model.prior_size = [SIZE // 8, SIZE // 8]
    return cfg


def in_channels(cfg) -> int:
    return 4 if cfg.dataset.get("use_depth") else 3


def one_step(cfg) -> tuple[float, float]:
    """(loss, largest parameter change) of one optimizer step of the experiment's model."""
    torch.manual_seed(0)
    model = app.build_model(cfg, in_channels(cfg))
    k = int(cfg.dataset.num_classes)
    # median_freq needs the dataset's files: uniform weights keep the weighted code path
    weights = None if cfg.loss.get("class_weights") is None else [1.0] * k
    loss_fn = instantiate(cfg.loss, class_weights=weights)
    app.check_outputs(cfg, model, loss_fn)
    optimizer = app.build_optimizer(cfg, app.param_groups(cfg, model))
    lr_factor = instantiate(cfg.lr)(max_iters=cfg.trainer.max_iters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # loss.label_stride (DeepLab v1/v2): the released nets take sides 32k - 31 (crop 321), so
    # that the ceil-mode pools' stride-8 logits have the shrunk label's size; 65 = 32 x 3 - 31
    size = SIZE + 1 if cfg.loss.get("label_stride") else SIZE
    image = torch.randn(2, in_channels(cfg), size, size)
    mask = torch.randint(0, k, (2, size, size))
    mask[:, :4] = int(cfg.dataset.ignore_index)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    loss = loss_fn(model(image), {"image": image, "mask": mask})["total"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    change = max((p.detach() - b).abs().max().item()
                 for p, b in zip(model.parameters(), before))
    return loss.item(), change


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in EXPERIMENTS])
def test_every_experiment_builds_and_takes_a_training_step(name, tmp_path, one_thread):
    cfg = experiment_config(name, tmp_path)
    loss, change = one_step(cfg)
    assert loss == loss and loss not in (float("inf"), float("-inf")), f"{name}: loss {loss}"
    assert change > 0, f"{name}: the optimizer step changed no parameter"


def test_deeplabv3plus_voc_defaults_to_resnet101_imagenet(tmp_path, monkeypatch):
    cfg = compose_config(["experiment=deeplabv3plus_voc", f"dataset.root={tmp_path}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    # DeepLab v3+ Table 3: ResNet-101 (DeepLab v3's multi-grid model), decoder, OS 16
    assert model["backbone"] == "resnet101" and model["pretrained"] == "imagenet"
    assert model["multi_grid"] == [1, 2, 4] and model["separable"] is False
    assert model["output_stride"] == 16 and model["low_level_channels"] == 48
    # "imagenet" resolves to torchvision's ResNet-101 file, which can be had: the build goes
    # as far as fetching it (stopped here, offline, with the URL it asked for)
    asked = []

    def offline(source):
        asked.append(str(source))
        raise RuntimeError("offline test")

    monkeypatch.setattr(pretrained_module, "resolve_checkpoint", offline)
    with pytest.raises(Exception, match="offline test"):
        app.build_model(cfg)
    assert asked and asked[0].startswith("https://") and "resnet101" in asked[0]


def test_xception65_imagenet_is_a_one_line_error_naming_what_to_provide(tmp_path):
    cfg = compose_config(["experiment=deeplabv3plus_voc", f"dataset.root={tmp_path}",
                          "model.backbone=xception65"])
    with pytest.raises(ConfigError) as err:
        app.build_model(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "model.pretrained=imagenet" in message and "xception_65" in message
    assert "model.pretrained=<path or URL>" in message and "resnet101" in message
