"""The CVPR 2020 models of the zoo (DSRL, HANet, SPNet, CPNet), what every model of the zoo
is checked for (tests/test_models_zoo.py): logits at the input size for odd sizes and the
keys each declares, optimizer groups holding every parameter once, fitting a tiny batch,
two steps through the app, and parameter counts closed-form and against the authors' code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segtrain.app import build_model, train
from segtrain.losses.ce import CrossEntropyLoss
from segtrain.losses.dsrl import DSRLLoss
from segtrain.models.modules.context_prior import AggregationModule, ContextPriorLayer
from segtrain.models.modules.strip_pooling import MixedPoolingModule, StripPoolingModule
from tests.conftest import compose_config
from tests.test_cpnet import small_cpnet
from tests.test_dsrl import small_dsrl
from tests.test_hanet import reference_model, small_hanet
from tests.test_models_zoo import K, n_params, tiny_batch
from tests.test_spnet import small_spnet

ODD_SIZES = [(33, 47), (65, 63)]
ALL_STAGES = ["layer1", "layer2", "layer3", "layer4", "layer5"]

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def spm_params(c: int) -> int:
    """1-D convs (3 taps, no bias) + BN on each strip, then the 1x1 fuse conv with bias."""
    return 2 * (3 * c * c + 2 * c) + c * c + c


def mpm_params(c: int) -> int:
    i = c // 4
    reduce = 2 * (c * i + 2 * i)
    short = 3 * (9 * i * i + 2 * i)  # 3x3 at full size + one 3x3 per pyramid bin
    long = 2 * (3 * i * i + 2 * i)   # 1x3 and 3x1 on the strips
    outs = 2 * (9 * i * i + 2 * i)
    return reduce + short + long + outs + 2 * i * c + 2 * c


def fcn_head_params(cin: int, mid: int, k: int) -> int:
    return 9 * cin * mid + 2 * mid + mid * k + k


RESNET101 = 42_500_160  # without fc (tests/test_models_zoo.py, PSPNet's count)
# the deep stems replace the 7x7 conv + BN (9,536) by three 3x3 convs + BNs and widen
# layer1's inputs (tests/test_deep_stem.py derives these by hand)
RESNET101S = RESNET101 + 123_776       # 64-64-128, SPNet's reference
RESNET101_V1C = RESNET101 + 19_232     # 32-32-64, CPNet's reference


def paper_model(name: str, **override) -> nn.Module:
    cfg = compose_config([f"model={name}", "dataset.num_classes=150",
                          *[f"model.{k}={v}" for k, v in override.items()]])
    with torch.device("meta"):
        return build_model(cfg)


# ---- output sizes and output keys -------------------------------------------------------

@pytest.mark.parametrize("name", ["dsrl", "dsrl_x4", "hanet", "hanet_all_stages"])
@pytest.mark.parametrize("size", ODD_SIZES)
def test_output_at_input_size_for_odd_sizes(name, size):
    torch.manual_seed(0)
    model = {"dsrl": small_dsrl, "dsrl_x4": lambda: small_dsrl(4), "hanet": small_hanet,
             "hanet_all_stages": lambda: small_hanet(ALL_STAGES)}[name]()
    x = torch.randn(2, 3, *size)
    train_out = model.train()(x)
    assert set(train_out) == model.output_keys
    assert train_out["out"].shape == (2, K, *size)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"out"} and out["out"].shape == (2, K, *size)
    assert torch.isfinite(out["out"]).all()


def test_param_groups_cover_every_parameter():
    for model in (small_dsrl(), small_hanet()):
        groups = model.param_groups()
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters()}
        backbone = {id(p) for g in groups if g["name"].startswith("backbone")
                    for p in g["params"]}
        assert backbone == {id(p) for p in model.backbone.parameters()}


# ---- fitting a tiny batch and training through the app -------------------------------------

@pytest.mark.parametrize("name", ["dsrl", "hanet"])
def test_fits_one_tiny_batch(name):
    torch.manual_seed(0)
    if name == "dsrl":  # the full DSRL loss: CE + SISR reconstruction + FA
        model, loss_fn, steps = small_dsrl(dropout=0.0), DSRLLoss(255, None, 0.4, 0.1, 1.0, 4), 80
    else:
        model = small_hanet(backbone="mobilenetv2", dropout=0.0)
        loss_fn, steps = CrossEntropyLoss(255, None, 0.4), 40
    image, mask = tiny_batch()  # the zoo's quadrant batch (tests/test_models_zoo.py)
    batch = {"image": image, "mask": mask}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        terms = loss_fn(model(batch["image"]), batch)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        losses.append(terms["total"].item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("overrides", [
    ["model=dsrl", "loss=dsrl", "model.backbone=mobilenetv2", "model.separable=true",
     "model.decoder_channels=32", "model.sr_channels=16", "loss.fa_pool=4"],
    ["model=hanet", "model.backbone=resnet18", "model.decoder_channels=32",
     "model.aux_channels=32", "model.output_stride=16"],
], ids=["dsrl", "hanet"])
def test_trains_two_steps_through_the_app(overrides, tiny_cfg, tmp_path):

    cfg = tiny_cfg(*overrides, "trainer.max_iters=2", "trainer.eval_interval=2",
                   "dataset.val.num_samples=2", "lr=step", "loss.class_weights=[1,2,1,1,1,1]")
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set(EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"])
    terms = {"ce", "sr", "fa", "total"} if "loss=dsrl" in overrides else {"ce", "aux", "total"}
    assert {f"train/loss/{t}" for t in terms} <= scalars, scalars


# ---- sizes and output keys ----------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 64), (67, 93)])
def test_spnet_and_cpnet_logits_at_input_size(size):
    h, w = size
    # the prior grid of a stride-8 ResNet: ceil(h / 8) x ceil(w / 8)
    grid = (-(-h // 8), -(-w // 8))
    torch.manual_seed(0)
    x = torch.randn(2, 3, h, w)
    for model in (small_spnet(), small_cpnet(grid)):
        out = model.train()(x)
        assert set(out) == model.output_keys
        assert out["out"].shape == out["aux"].shape == (2, K, h, w)
        if "prior" in out:
            n = grid[0] * grid[1]
            assert out["prior"].shape == (2, n, n)
            assert ((out["prior"] > 0) & (out["prior"] < 1)).all()
        model.eval()
        with torch.no_grad():
            first = model(x)
            assert set(first) == {"out"} and first["out"].shape == (2, K, h, w)
            assert torch.equal(model(x)["out"], first["out"])


def test_module_parameter_counts_closed_form():
    assert n_params(StripPoolingModule(64)) == spm_params(64) == 7 * 64 * 64 + 5 * 64
    assert n_params(MixedPoolingModule(1024, (20, 12))) == mpm_params(1024)
    agg = 9 * 2048 * 512 + 2 * 512 + 4 * (11 * 512 + 512) + 2 * 512
    assert n_params(AggregationModule(2048, 512, 11)) == agg
    n = 64 * 64
    layer = agg + 512 * n + 2 * n + 2 * (512 * 512 + 2 * 512)
    assert n_params(ContextPriorLayer(2048, 512, (64, 64), 11)) == layer


def test_paper_configs_parameter_counts():
    """ADE20K (150 classes), the papers' main benchmark, layer by layer."""
    k = 150
    gates = sum(spm_params(c) for c in (64, 128, 256, 512, 512, 512))
    spnet = (RESNET101S + gates + (2048 * 1024 + 2 * 1024) + 2 * mpm_params(1024)
             + fcn_head_params(1024, 512, k) + fcn_head_params(1024, 256, k))
    assert n_params(paper_model("spnet")) == spnet
    n = 64 * 64  # the official prior_size 64 at 512x512 crops
    layer = (9 * 2048 * 512 + 2 * 512 + 4 * (11 * 512 + 512) + 2 * 512
             + 512 * n + 2 * n + 2 * (512 * 512 + 2 * 512))
    cpnet = (RESNET101_V1C + layer + fcn_head_params(2048 + 2 * 512, 512, k)
             + fcn_head_params(1024, 256, k))
    assert n_params(paper_model("cpnet", prior_size="[64,64]")) == cpnet


def test_parameter_counts_match_the_reference_code():
    """shachoi/HANet (ResNet-101, 19 classes) 64,803,149; houqb/SPNet 66,729,382;
    ContextPrior on mmsegmentation (prior 64 x 64) 71,146,118. HANet differs by exactly
    the choices hanet.py states: frozen positional tables of 17 rows, a bias before BN in
    each module's second conv and in the auxiliary head's 3x3 conv."""
    hanet = reference_model("hanet")
    mids = [m.conv1[0].out_channels for m in hanet.attention.values()]
    assert mids == [16, 32, 20, 5]  # ceil(C_l / 64) for C_l = 1024, 2048, 1280, 304
    tables = sum(17 * m for m in mids)
    biases = sum(2 * m for m in mids) + hanet.aux_head[0][0].out_channels
    assert n_params(hanet) + tables + biases == 64_803_149
    assert n_params(reference_model("spnet")) == 66_729_382
    assert n_params(reference_model("cpnet", prior_size=[64, 64])) == 71_146_118
