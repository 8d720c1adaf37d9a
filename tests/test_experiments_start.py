"""Every experiment starts, through the functions training calls.

Each ``conf/experiment/*.yaml`` is composed as ``python -m segtrain experiment=<name>``
composes it, passes the config schema, and ``app.build_training`` (what ``app.train``
calls) builds its model, loss, optimizer, schedule and batch on the meta device: no memory,
no weights, the whole set in seconds. Then each takes one optimizer step on a tiny batch
on the CPU through ``app.build_trainer``'s ``Trainer.fit`` (the ResNet-101 / VGG-16 paper
models in the slow suite). ImageNet weights are off (no download here) and the staged
experiments (FCN-16s/8s, DeepLab v3's second stage) start from their own initialisation
(``model.init_from=null``); SegNet's median-frequency weights are computed from a CamVid
miniature. DeepLab v3+ on VOC defaults to a backbone whose ImageNet weights exist
(ResNet-101, the paper's Table 3 rows), and asking for Xception-65 ImageNet weights is a
one-line error naming what to provide.
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from omegaconf import OmegaConf

from segtrain import app, config_schema
from segtrain.core.distributed import DistInfo
from segtrain.engine.callbacks.base import Callback
from segtrain.errors import ConfigError
from segtrain.models.backbones import pretrained as pretrained_module
from tests.conftest import CONF_DIR, compose_config
from tests.dataset_miniatures import make_camvid

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
SIZE = 64  # input side of the tiny batch; CPNet's prior grid is scaled to it (stride 8)
# ResNet-101 / VGG-16 paper models: several seconds per step on two cores
SLOW = {"cpnet_cityscapes", "deeplabv2_voc", "deeplabv3_voc", "deeplabv3plus_voc",
        "dsrl_cityscapes", "fcn8s_voc", "fcn16s_voc", "fcn32s_voc", "hanet_cityscapes",
        "pspnet_cityscapes", "pspnet_voc", "spnet_cityscapes", "deeplabv2_resnet_ablation",
        "deeplabv2_aspp_ablation", "deeplabv1_voc"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A folder for ``dataset.root`` holding a CamVid miniature (the other datasets are not
    read before training starts); the class statistics cache goes beside it."""
    folder = tmp_path_factory.mktemp("experiments")
    make_camvid(folder / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        yield folder / "data"


@functools.cache
def composed(name: str, root: str):
    """``experiment=<name>`` composed once per test session (composing costs most of a
    meta build)."""
    # ++: experiments on the embedded dataset (unet) have no root to set
    return compose_config([f"experiment={name}", f"++dataset.root={root}"])


def experiment_config(name: str, root, **trainer):
    """The experiment's config with ImageNet weights and ``model.init_from`` off, CPNet's
    prior grid fitted to the tiny batch and ``trainer`` keys set as given."""
    cfg = copy.deepcopy(composed(name, str(root)))
    if "pretrained" in cfg.model:
        cfg.model.pretrained = None
    cfg.model.init_from = None
    if cfg.model.get("prior_size") is not None:  # CPNet: the prior grid is the stride-8 map
        cfg.model.prior_size = [SIZE // 8, SIZE // 8]
    for key, value in trainer.items():
        cfg.trainer[key] = value
    return cfg


def in_channels(cfg) -> int:
    return 4 if cfg.dataset.get("use_depth") else 3


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_builds_on_the_meta_device(name, data_root):
    cfg = experiment_config(name, data_root)
    config_schema.check(cfg)
    # SegNet's median-frequency weights: counted once on the CPU (a DataLoader cannot start
    # under the meta device), then read from their cache as every later run does
    app.class_weights(cfg)
    with torch.device("meta"):
        training = app.build_training(cfg, in_channels(cfg))
    # the optimizer holds every trainable parameter once, at the config's base rate times
    # a multiplier
    held = [id(p) for g in training.optimizer.param_groups for p in g["params"]]
    trainable = {id(p) for p in training.model.parameters() if p.requires_grad}
    assert len(held) == len(set(held)) and set(held) == trainable, name
    rates = [g["lr"] for g in training.optimizer.param_groups]
    assert min(rates) >= 0 and max(rates) > 0, rates
    factors = [training.lr_factor(i) for i in (0, int(cfg.trainer.max_iters) - 1)]
    assert all(0 <= f <= 1 for f in factors), factors


class LastTerms(Callback):
    """Keeps the loss terms the trainer logs."""

    def __init__(self) -> None:
        self.terms: dict[str, float] = {}

    def on_log(self, trainer, terms, rate) -> None:
        self.terms = terms


def tiny_batch(cfg) -> dict:
    k = int(cfg.dataset.num_classes)
    # loss.label_stride (DeepLab v1/v2): the released nets take sides 32k - 31 (crop 321), so
    # that the ceil-mode pools' stride-8 logits have the shrunk label's size; 65 = 32 x 3 - 31
    size = SIZE + 1 if cfg.loss.get("label_stride") else SIZE
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(2, in_channels(cfg), size, size, generator=generator),
             "mask": torch.randint(0, k, (2, size, size), generator=generator), "meta": []}
    batch["mask"][:, :4] = int(cfg.dataset.ignore_index)
    if cfg.dataset.get("source_rows"):  # HANet: each pixel's row in the full image
        rows = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        batch["rows"] = rows[None, :, None].expand(2, size, size).contiguous()
    return batch


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in EXPERIMENTS])
def test_every_experiment_takes_a_training_step(name, data_root, tmp_path, one_thread):
    # one step of one micro-batch: trainer.iter_size 10 (DeepLab v2) would take ten
    cfg = experiment_config(name, data_root, max_iters=1, iter_size=1, device="cpu",
                            precision="fp32", compile=False, channels_last=False)
    config_schema.check(cfg)
    training = app.build_training(cfg, in_channels(cfg))
    before = [p.detach().clone() for p in training.model.parameters()]
    batch = tiny_batch(cfg)
    logged = LastTerms()
    trainer = app.build_trainer(cfg, training, lambda start: itertools.repeat(batch),
                                tmp_path / "run", torch.device("cpu"), DistInfo(), [logged])
    trainer.fit()
    assert trainer.iteration == 1
    loss = logged.terms["total"]
    assert loss == loss and abs(loss) != float("inf"), f"{name}: loss {loss}"
    change = max((p.detach() - b).abs().max().item()
                 for p, b in zip(training.model.parameters(), before))
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
