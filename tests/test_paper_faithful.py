"""The papers' training details: DeepLab v1 LargeFOV as released, DeepLab v2's
VGG-16 head ablation, FCN's staged training (model.init_from), SegNet-Basic's input LRN,
U-Net's weight map and elastic deformation. Each test fails on the code before them.
"""

from __future__ import annotations

import math
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from segtrain import app, config_schema
from segtrain.core import checkpoint
from segtrain.data.transforms import compose
from segtrain.errors import ConfigError
from segtrain.losses.ce import CrossEntropyLoss
from segtrain.losses.unet_weights import class_balance_map, unet_weight_map
from segtrain.models.fcn import CROP_FINAL, FCN
from segtrain.models.init_from import init_from
from segtrain.models.segnet import SegNetBasic
from tests import conftest
from tests.conftest import compose_config

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def model_from_yaml(name: str, num_classes: int = 21, **override) -> nn.Module:
    return conftest.model_from_yaml(name, num_classes, **override)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


VGG16_CONVS = 14_714_688  # the 13 3x3 convolutions of VGG-16 with biases (Table 1, column D)


def vgg_branch_params(num_classes: int) -> int:
    """fc6 3x3x512->1024, fc7 1x1 1024->1024, fc8 1x1 1024->classes, each with biases."""
    return (9 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * num_classes + num_classes)


# ---- DeepLab v1 LargeFOV as released -----------------------------------------------------

@pytest.fixture(scope="module")
def deeplabv1():
    torch.manual_seed(0)
    return model_from_yaml("deeplabv1")


def test_deeplabv1_pools_are_the_released_3x3_ones_and_give_output_stride_8(deeplabv1):
    pools = [m for m in deeplabv1.backbone.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == \
        [(3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1), (3, 1, 1)]
    dilations = [m.dilation[0] for m in deeplabv1.backbone.features if isinstance(m, nn.Conv2d)]
    assert dilations == [1] * 10 + [2] * 3  # conv5 dilated by 2 after the stride-1 pool4
    # the released net's sizes: an input of 32k - 31 pixels gives k... 8k - 7 at stride 8
    # (321 -> 41); with VGG's 2x2 pools 65 would give 8, not 9
    with torch.no_grad():
        c5 = deeplabv1.eval().backbone.forward_features(torch.randn(1, 3, 65, 65))["c5"]
    assert c5.shape[-2:] == (9, 9)


def test_deeplabv1_pool5a_is_caffe_average_pooling(deeplabv1):
    pool = deeplabv1.pool5a
    assert isinstance(pool, nn.AvgPool2d)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
    # Caffe's AVE pooling divides by the whole 3x3 window, padding included: a corner of a
    # map of ones averages 4 ones over 9
    out = pool(torch.ones(1, 1, 4, 4))
    assert out[0, 0, 0, 0].item() == pytest.approx(4 / 9) and out[0, 0, 1, 1].item() == 1.0
    seen = {}
    hook = deeplabv1.head.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        x = torch.randn(1, 3, 33, 33)
        deeplabv1.eval()(x)
        c5 = deeplabv1.backbone.forward_features(x)["c5"]
    hook.remove()
    assert torch.equal(seen["x"], F.avg_pool2d(c5, 3, 1, 1))


def test_deeplabv1_dropout_is_element_wise(deeplabv1):
    branch = deeplabv1.head.branches[0]
    drops = [m for m in branch.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert len(drops) == 2 and all(type(d) is nn.Dropout and d.p == 0.5 for d in drops)
    torch.manual_seed(0)
    y = drops[0].train()(torch.ones(1, 64, 8, 8))
    zeros = (y == 0).float().mean(dim=(2, 3))  # per-channel fraction dropped
    # channel-wise dropout would drop whole channels (fractions 0 or 1 only)
    assert ((zeros > 0) & (zeros < 1)).all()
    assert abs((y == 0).float().mean().item() - 0.5) < 0.05


def test_deeplabv1_fc6_and_parameter_count(deeplabv1):
    fc6, fc7 = deeplabv1.head.branches[0].layers[0], deeplabv1.head.branches[0].layers[3]
    assert (fc6.kernel_size, fc6.dilation, fc6.out_channels) == ((3, 3), (12, 12), 1024)
    assert (fc7.kernel_size, fc7.out_channels) == ((1, 1), 1024)
    # v1 Table 2: DeepLab-LargeFOV 20.5M parameters; pools and pool5a add none
    assert n_params(deeplabv1) == VGG16_CONVS + vgg_branch_params(21) == 20_505_429


def test_deeplabv1_only_fc8_learns_at_10x_and_20x(tmp_path):
    model = model_from_yaml("deeplabv1")
    cfg = compose_config(["experiment=deeplabv1_voc", f"dataset.root={tmp_path}"])
    groups = {g["name"]: g for g in app.param_groups(cfg, model)}
    fc8 = model.head.branches[0].layers[-1]
    assert groups["head"]["params"] == [fc8.weight] and groups["head"]["lr_mult"] == 10
    assert groups["head_bias"]["params"] == [fc8.bias] and groups["head_bias"]["lr_mult"] == 20
    fc6 = model.head.branches[0].layers[0]
    assert any(p is fc6.weight for p in groups["backbone"]["params"])
    assert groups["backbone"]["lr_mult"] == 1.0
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_params(model)


def test_deeplabv1_voc_experiment_is_the_released_solver(tmp_path):
    cfg = compose_config(["experiment=deeplabv1_voc", f"dataset.root={tmp_path}"])
    assert cfg.model._target_.endswith("DeepLabV1") and cfg.model.pretrained == "imagenet"
    paramwise = cfg.optim.paramwise  # fc8 10x; its bias 10 x the prototxts' bias 2x
    assert (paramwise.head_lr_mult, paramwise.bias_lr_mult, paramwise.bias_decay_mult) == \
        (10, 2, 0)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.001, 0.9, 0.0005)
    assert cfg.trainer.max_iters == 6000
    assert app.train_batch(cfg, 1).images_per_step == 20
    assert list(cfg.dataset.crop_size) == [321, 321]
    factor = instantiate(cfg.lr)(max_iters=cfg.trainer.max_iters)
    assert [factor(i) for i in (0, 1999, 2000, 3999, 4000, 5999)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # no scale augmentation in v1: crops of the image as it is, mirrored
    steps = compose(instantiate(cfg.dataset.train_transforms)).transforms
    names = [type(t).__name__ for t in steps]
    assert "RandomScaleChoice" not in names and "RandomCrop" in names and \
        "HorizontalFlip" in names


# ---- DeepLab v2 on VGG-16: the head ablation ---------------------------------------------

@pytest.mark.parametrize("head, rates", [("largefov", [12]), ("aspp_s", [2, 4, 8, 12]),
                                         ("aspp_l", [6, 12, 18, 24])])
def test_deeplabv2_vgg16_heads(head, rates):
    with torch.device("meta"):
        model = model_from_yaml("deeplabv2_vgg16", head=head)
    assert model.output_keys == frozenset({"out", "out_lowres"})
    branches = model.head.branches
    assert [b.layers[0].dilation[0] for b in branches] == rates
    for b in branches:  # each branch its own fc6 (3x3 atrous, 1024) -> fc7 (1x1) -> fc8
        convs = [m for m in b.layers if isinstance(m, nn.Conv2d)]
        assert [(c.kernel_size[0], c.out_channels) for c in convs] == \
            [(3, 1024), (1, 1024), (1, 21)]
        assert [type(m) for m in b.layers if isinstance(m, nn.Dropout)] == [nn.Dropout] * 2
    # hand-derived from the layer sizes: VGG-16 convs + one fc6-fc7-fc8 per branch
    assert n_params(model) == VGG16_CONVS + len(rates) * vgg_branch_params(21)


def test_deeplabv2_vgg16_parameter_counts_and_summed_branches():
    assert VGG16_CONVS + 4 * vgg_branch_params(21) == 37_877_652  # ASPP-L / ASPP-S
    assert VGG16_CONVS + vgg_branch_params(21) == 20_505_429      # LargeFOV = v1's 20.5M
    torch.manual_seed(0)
    model = model_from_yaml("deeplabv2_vgg16", num_classes=3, head="aspp_s").eval()
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        feats = model.backbone.forward_features(x)["c5"]
        summed = sum(b(feats) for b in model.head.branches)
        ref = F.interpolate(summed, size=(41, 41), mode="bilinear", align_corners=False)
        assert torch.allclose(model(x)["out"], ref, atol=1e-6)


def test_aspp_ablation_is_on_vgg16_and_resnet_study_is_its_own(tmp_path):
    cfg = compose_config(["experiment=deeplabv2_aspp_ablation", f"dataset.root={tmp_path}"])
    assert cfg.model._target_.endswith("DeepLabV2") and cfg.model.backbone == "vgg16"
    assert cfg.optim.lr == 0.001 and cfg.model.pool_kernel == 3
    res = compose_config(["experiment=deeplabv2_resnet_ablation", f"dataset.root={tmp_path}"])
    assert res.model.backbone == "resnet101"
    for name in ("deeplabv2_aspp_ablation", "deeplabv2_resnet_ablation"):  # both sweep heads
        sweep = OmegaConf.load(CONF_MODEL.parent / "experiment" / f"{name}.yaml")
        assert sweep.hydra.sweeper.params["model.head"] == "largefov,aspp_s,aspp_l"


# ---- FCN staged training: model.init_from -----------------------------------------------

def test_fcn16s_from_a_fcn32s_checkpoint_predicts_what_the_32s_scores_say(tmp_path, tiny_cfg):
    from segtrain.app import build_model

    torch.manual_seed(0)
    # VGG-16 at 1/8 of its channels (segtrain.reproduce scale=tiny's option): the same layers
    # and init_from path as the paper's width, 64x fewer weights
    fcn32 = FCN(6, 32, None, True, False, 0.5, width=0.125)
    with torch.no_grad():  # a "trained" classifier: non-zero scores
        fcn32.score_fr.weight.normal_(0, 0.01)
        fcn32.score_fr.bias.normal_()
    # saved as the trainer saves: checkpoints/last.pt of a run folder, under "model"
    checkpoint.save_atomic({"model": fcn32.state_dict(), "iteration": 7},
                           tmp_path / "run32" / "checkpoints" / "last.pt")
    cfg = tiny_cfg("model=fcn16s", "model.width=0.125", f"model.init_from={tmp_path / 'run32'}")
    fcn16 = build_model(cfg, initialise=True).eval()
    fcn32.eval()
    own32 = fcn32.state_dict()
    for key, value in fcn16.state_dict().items():
        if key in own32 and own32[key].shape == value.shape:
            assert torch.equal(value, own32[key]), key
    assert fcn16.score_pool4.weight.abs().sum() == 0 and fcn16.score_pool4.bias.abs().sum() == 0

    coarse = {}
    hooks = [m.score_fr.register_forward_hook(lambda mod, i, o, k=k: coarse.update({k: o}))
             for k, m in (("32", fcn32), ("16", fcn16))]
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        out32, out16 = fcn32(x)["out"], fcn16(x)["out"]
        # the coarse class scores are the 32s net's, bit for bit ...
        assert torch.equal(coarse["16"], coarse["32"])
        # ... and the zero pool4 scores add exactly nothing: the 16s output is the 32s
        # scores upsampled along the 16s path (2x bilinear, 16x bilinear, reference crop)
        up = fcn16.upscore(fcn16.upscore2(coarse["32"]))
        c = CROP_FINAL[16]
        assert torch.equal(out16, up[:, :, c:c + 37, c:c + 45])
    for h in hooks:
        h.remove()
    assert out16.shape == out32.shape
    # 2x-then-16x bilinear is not 32x bilinear (half-pixel sampling), so the two outputs
    # agree only approximately; the classes they predict mostly agree
    assert (out16.argmax(1) == out32.argmax(1)).float().mean() > 0.9


def test_init_from_reports_and_refuses_unrelated_checkpoints(tmp_path):
    torch.manual_seed(0)
    small = SegNetBasic(3, 2, 8, 3)
    checkpoint.save_atomic({"model": small.state_dict()}, tmp_path / "a.pt")
    wider = SegNetBasic(5, 2, 8, 3)  # another class count: only the classifier differs
    report = init_from(wider, tmp_path / "a.pt")
    assert report.mismatched == ["classifier.weight", "classifier.bias"]
    assert not report.new and not report.unused
    assert torch.equal(wider.encoders[0][0].weight, small.encoders[0][0].weight)
    assert "copied" in report.summary() and "classifier.weight" in report.summary()
    checkpoint.save_atomic({"model": {"other.weight": torch.zeros(2)}}, tmp_path / "b.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no tensor of .*b.pt matches"):
        init_from(wider, tmp_path / "b.pt")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint not found"):
        init_from(wider, tmp_path / "missing")


def test_fcn_experiments_use_the_reference_solver(tmp_path):
    pixels = 500 * 375
    for stride, ref_lr in ((32, 1e-10), (16, 1e-12), (8, 1e-14)):
        cfg = compose_config([f"experiment=fcn{stride}s_voc", f"dataset.root={tmp_path}"])
        assert cfg.model.stride == stride
        assert cfg.optim.lr == pytest.approx(ref_lr * pixels, rel=1e-9)
        assert cfg.optim.weight_decay == pytest.approx(5e-4 / pixels, rel=1e-3)
        assert cfg.optim.momentum == 0.99
        batch = app.train_batch(cfg, 1)
        assert (batch.images_per_step, batch.iter_size) == (1, 1)
        assert cfg.trainer.max_iters == 100_000
        assert instantiate(cfg.lr)(max_iters=100_000)(99_999) == 1.0  # "fixed"
        # staged: 16s and 8s must name the net they start from
        if stride == 32:
            config_schema.check(cfg)
        else:
            with pytest.raises(ConfigError, match=r"^model.init_from=\?\?\? must be set"):
                config_schema.check(cfg)


# ---- SegNet-Basic input LRN --------------------------------------------------------------

def test_segnet_basic_input_lrn_is_the_reference_layer():
    torch.manual_seed(0)
    with_lrn = model_from_yaml("segnet_basic", num_classes=11).eval()
    without = model_from_yaml("segnet_basic", num_classes=11, input_lrn=None).eval()
    without.load_state_dict(with_lrn.state_dict())  # the same keys: LRN has no parameters
    lrn = with_lrn.input_norm
    assert isinstance(lrn, nn.LocalResponseNorm)
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, 1.0)
    assert isinstance(without.input_norm, nn.Identity)
    assert n_params(with_lrn) == n_params(without)
    x = 255 * torch.rand(1, 3, 32, 32)  # the reference feeds raw pixels
    with torch.no_grad():
        assert not torch.allclose(with_lrn(x)["out"], without(x)["out"])
        # Caffe's LRN across channels: x / (k + alpha / n * sum over the window of x^2)^beta;
        # with 3 channels and local_size 5 every window holds all three
        ref = x / (1 + 1e-4 / 5 * (x**2).sum(1, keepdim=True)) ** 0.75
        assert torch.allclose(lrn(x), ref, rtol=1e-5)


# ---- U-Net weight map and elastic deformation --------------------------------------------

def two_touching_cells() -> np.ndarray:
    """Two class-1 squares separated by a one-pixel background line (column 29)."""
    mask = np.zeros((40, 60), np.int64)
    mask[10:30, 10:29] = 1
    mask[10:30, 30:50] = 1
    mask[0, 59] = 255
    return mask


def test_unet_weight_map_between_touching_cells_and_far_away():
    mask = two_touching_cells()
    w = unet_weight_map(mask, w0=10.0, sigma=5.0, ignore_index=255, background=0)
    wc = class_balance_map(mask, 255)
    valid = mask != 255
    assert wc[valid].mean() == pytest.approx(1.0)
    # every class present gets the same total weight
    totals = [wc[mask == c].sum() for c in (0, 1)]
    assert totals[0] == pytest.approx(totals[1])
    # on the separation line d1 = d2 = 1: w = w_c + w0 exp(-4 / 50)
    assert w[20, 29] == pytest.approx(wc[20, 29] + 10 * math.exp(-4 / 50), rel=1e-6)
    assert w[20, 29] > wc[20, 29] + 9
    # far from both cells the border term vanishes
    assert w[39, 0] == pytest.approx(wc[39, 0], abs=1e-6)
    # inside a cell there is no border term; ignored pixels weigh nothing
    assert w[20, 20] == wc[20, 20] and w[0, 59] == 0
    # one cell alone has no "second nearest" border
    single = mask.copy()
    single[10:30, 30:50] = 0
    assert np.array_equal(unet_weight_map(single, 10.0, 5.0), class_balance_map(single, 255))


def test_ce_with_unet_weight_map_is_the_weighted_energy():
    mask = torch.from_numpy(two_touching_cells())[None]
    logits = torch.randn(1, 2, 40, 60)
    loss = CrossEntropyLoss(255, None, 0.4, unet_weight_map={"w0": 10, "sigma": 5})
    w = torch.from_numpy(unet_weight_map(mask[0].numpy(), 10.0, 5.0))
    ce = F.cross_entropy(logits, mask, ignore_index=255, reduction="none")
    expected = (w * ce).sum() / (mask != 255).sum()
    assert torch.allclose(loss({"out": logits}, {"mask": mask})["ce"], expected)
    plain = CrossEntropyLoss(255, None, 0.4)({"out": logits}, {"mask": mask})["ce"]
    assert not torch.allclose(plain, expected)
    with pytest.raises(ConfigError, match="class_weights"):
        CrossEntropyLoss(255, [1.0, 2.0], 0.4, unet_weight_map={"w0": 10, "sigma": 5})
    with pytest.raises(ConfigError, match="loss.unet_weight_map"):
        CrossEntropyLoss(255, None, 0.4, unet_weight_map={"w0": 10})


def test_grid_elastic_has_the_papers_displacements():
    from segtrain.data.transforms import GridElastic

    t = GridElastic(grid=3, std=10.0)
    t.set_random_seed(0)
    corner, centre = [], []
    for _ in range(400):
        maps = t.get_params_dependent_on_data({"shape": (41, 61)}, {})
        corner.append(maps["map_x"][0, 0] - 0.0)
        centre.append(maps["map_y"][20, 30] - 20.0)  # the middle control point
    # the control points move by N(0, 10^2) pixels
    assert np.std(corner) == pytest.approx(10, rel=0.15)
    assert np.std(centre) == pytest.approx(10, rel=0.15)
    mask = (np.arange(41 * 61).reshape(41, 61) % 7).astype(np.uint8)
    image = np.random.default_rng(0).integers(0, 255, (41, 61, 3), dtype=np.uint8)
    out = A.Compose([GridElastic(3, 10.0, p=1.0)], seed=1)(image=image, mask=mask)
    assert out["image"].shape == image.shape and out["mask"].shape == mask.shape
    assert set(np.unique(out["mask"])) <= set(np.unique(mask))  # nearest: no new labels
    assert not np.array_equal(out["mask"], mask)
    still = A.Compose([GridElastic(3, 0.0, p=1.0)], seed=1)(image=image, mask=mask)
    assert np.array_equal(still["image"], image) and np.array_equal(still["mask"], mask)


# ---- new configs train through the real app ---------------------------------------------

@pytest.mark.parametrize("overrides", [
    ["experiment=unet", "model.base_channels=4"],
    ["model=segnet_basic", "model.channels=8"],
    ["model=deeplabv2_vgg16", "model.head=aspp_s"],
    ["model=deeplabv1"],
])
def test_new_configs_train_two_steps_through_the_app(overrides, tiny_cfg, tmp_path):
    from segtrain.app import train

    cfg = tiny_cfg(*overrides, "trainer.max_iters=2", "trainer.eval_interval=2",
                   "trainer.global_batch_size=2", "dataset.val.num_samples=2")
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_new_options_refuse_bad_values_with_the_key():
    from segtrain.data.transforms import GridElastic
    from segtrain.models.deeplab import DeepLabV2

    rates = {"largefov": [12]}
    with pytest.raises(ConfigError, match="model.pool_kernel=3.*vgg16 backbone only"):
        DeepLabV2(3, "resnet18", 8, "largefov", rates, pool_kernel=3)
    with pytest.raises(ConfigError, match="model.input_lrn must be null or have keys"):
        SegNetBasic(3, 2, 8, 3, input_lrn={"size": 5, "alpha": 1e-4})
    with pytest.raises(ConfigError, match="GridElastic.*grid must be at least 2"):
        GridElastic(grid=1)
