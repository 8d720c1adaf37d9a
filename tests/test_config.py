"""Every config option composes, and the pieces it names can be built; bad options and keys
get Hydra's own clear errors."""

from __future__ import annotations

import subprocess

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain import app
from segtrain.app import build_model, build_optimizer
from segtrain.core.precision import resolve_precision
from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_list_has_every_group():
    cfg = compose_config()
    for group in ("dataset", "model", "loss", "lr", "optim", "trainer", "eval"):
        assert group in cfg, group
    assert cfg.get("experiment") is None


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_options_compose_with_the_keys_the_app_reads(name, tmp_path):
    cfg = compose_config([f"dataset={name}", f"dataset.root={tmp_path}"] if name != "synthetic"
                         else [f"dataset={name}"])
    d = cfg.dataset
    for key in ("name", "num_classes", "ignore_index", "mean", "std", "train", "val",
                "train_transforms", "val_transforms"):
        assert key in d, f"dataset={name} lacks {key}"
    resolved = OmegaConf.to_container(d, resolve=True)
    assert resolved["ignore_index"] == 255
    assert resolved["train"]["_target_"].startswith("segtrain.data.")
    # the augmentation pipelines instantiate (albumentations objects)
    assert len(instantiate(d.train_transforms)) >= 1
    assert len(instantiate(d.val_transforms)) >= 1


def test_real_dataset_without_root_is_hydras_missing_value_error():
    cfg = compose_config(["dataset=camvid"])
    message = r"Missing mandatory value: root\n\s+full_key: dataset.root"
    with pytest.raises(Exception, match=message):
        OmegaConf.to_container(cfg.dataset, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("name", options("model"))
def test_model_options_build_and_give_param_groups(name):
    cfg = compose_config([f"model={name}", "dataset.num_classes=3"])
    model = build_model(cfg)
    # with the config's own multipliers: every trainable parameter in exactly one group
    groups = app.param_groups(cfg, model)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)), f"model={name}: a parameter in two groups"
    assert set(grouped) == trainable, f"model={name}: param_groups miss parameters"
    mults = {g["name"]: g["lr_mult"] for g in groups}
    if "head" in mults:  # the policy's head multiple reaches the head's weights
        assert mults["head"] == cfg.optim.paramwise.head_lr_mult, name


@pytest.mark.parametrize("name", options("loss"))
def test_loss_options_build_and_return_total(name):
    # the affinity loss takes its prior size from the model (CPNet's model.prior_size)
    cfg = compose_config([f"loss={name}", "model=cpnet", "model.prior_size=[4,4]"])
    loss = instantiate(cfg.loss)
    # every output the loss declares it needs: logits-shaped, the SISR image 3-channel, the
    # context prior (B, N, N) with N = 4 x 4 positions, values in (0, 1)
    needs = getattr(loss, "required_keys", {"out"})
    out = {k: torch.randn(2, 3 if k == "sr" else 6, 8, 8) for k in needs if k != "prior"}
    if "prior" in needs:
        out["prior"] = torch.rand(2, 16, 16).clamp(0.01, 0.99)
    batch = {"mask": torch.randint(0, 6, (2, 8, 8)), "image": torch.randn(2, 3, 8, 8)}
    terms = loss(out, batch)
    assert "total" in terms and terms["total"].ndim == 0


@pytest.mark.parametrize("name", options("lr"))
def test_lr_options_build_a_schedule(name):
    cfg = compose_config([f"lr={name}"])
    # long enough for schedules with milestones in iterations (DeepLab v1: every 2000)
    factor = instantiate(cfg.lr)(max_iters=10_000)
    assert factor(0) == pytest.approx(1.0)
    if name == "constant":  # Caffe's "fixed" policy (FCN's solvers)
        assert factor(9_999) == 1.0
    else:
        assert 0.0 <= factor(9_999) < 1.0


@pytest.mark.parametrize("name", options("optim"))
def test_optim_options_build_with_group_multipliers(name):
    cfg = compose_config([f"optim={name}"])
    w, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer(cfg, [{"params": [w], "lr_mult": 1.0},
                                {"params": [b], "lr_mult": 20.0, "weight_decay_mult": 0.0}])
    assert opt.param_groups[1]["lr"] == pytest.approx(20 * cfg.optim.lr)
    assert opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", options("eval"))
def test_eval_options_build_a_predictor(name):
    """Every eval option's predictor (scales, fusion, flip, windows) leaves the logits of a
    constant image as they are (resizing, fusing, flipping or stitching a constant map is
    the identity), at the image's size, whatever the image size and window layout."""
    cfg = compose_config([f"eval={name}", "eval.predictor.crop_size=[24,24]",
                          "eval.predictor.stride=[16,16]"] if "slide" in name
                         else [f"eval={name}"])
    predictor = instantiate(cfg.eval.predictor)
    conv = torch.nn.Conv2d(3, 4, 1)

    def model(image):
        return {"out": conv(image)}

    image = torch.full((1, 3, 37, 53), 0.7)
    with torch.no_grad():
        logits = predictor(model, image)
        assert logits.shape == (1, 4, 37, 53)
        torch.testing.assert_close(logits, conv(image), rtol=1e-5, atol=1e-5)
    if cfg.eval.crf is not None:
        assert instantiate(cfg.eval.crf).iterations > 0


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options_compose(name):
    cfg = compose_config([f"trainer={name}"])
    # every value resolves, and the precision means an autocast on this CPU
    OmegaConf.to_container(cfg.trainer, resolve=True, throw_on_missing=True)
    resolve_precision(cfg.trainer.precision, torch.device("cpu"))


def test_deeplabv2_head_choice_builds_the_papers_rates():
    # DeepLab v2 Sec. 3.3 / Fig. 7: ASPP-S rates 2, 4, 8, 12; ASPP-L 6, 12, 18, 24; LargeFOV 12
    for head, rates in (("aspp_s", [2, 4, 8, 12]), ("aspp_l", [6, 12, 18, 24]),
                        ("largefov", [12])):
        cfg = compose_config(["model=deeplabv2_resnet18", f"model.head={head}"])
        model = build_model(cfg)
        fc6 = [branch.layers[0] for branch in model.head.branches]
        assert [conv.dilation for conv in fc6] == [(r, r) for r in rates], head
        assert [conv.padding for conv in fc6] == [(r, r) for r in rates], head


def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("segtrain", *args)


def test_wrong_group_option_is_a_clear_hydra_error():
    res = _cli("model=deeplab_v9")
    assert res.returncode != 0
    assert "Could not find 'model/deeplab_v9'" in res.stderr
    assert "Available options" in res.stderr and "deeplabv2" in res.stderr
    assert "Traceback" not in res.stderr


def test_wrong_key_is_a_clear_hydra_error():
    res = _cli("trainer.max_iter=5")
    assert res.returncode != 0
    assert "max_iter" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(name, tmp_path):
    # ++: experiments on the embedded dataset (unet) have no root to set
    cfg = compose_config([f"experiment={name}", f"++dataset.root={tmp_path}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["trainer"]["max_iters"] > 0
    assert resolved["model"]["num_classes"] == resolved["dataset"]["num_classes"]


# FCN's reference geometry pads the input by 100 pixels: ~25 s for two steps on 2 cores;
# SPNet and CPNet at their paper size (ResNet-101 with strip pooling / the context prior)
# take 75-100 s, and their own test files train them through the app with small backbones
SLOW_MODELS = ("fcn8s", "fcn16s", "fcn32s", "spnet", "cpnet")


def _slow(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW_MODELS else name


@pytest.mark.parametrize("name", [_slow(n) for n in options("model")])
def test_every_model_config_trains_through_the_app(name, tiny_cfg, tmp_path):
    # two steps of the real path (dataset -> model -> loss -> trainer -> evaluator) per model
    from segtrain.app import train

    cfg = tiny_cfg(f"model={name}", "trainer.max_iters=2", "trainer.eval_interval=2",
                   "dataset.val.num_samples=2", "lr=step")
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
