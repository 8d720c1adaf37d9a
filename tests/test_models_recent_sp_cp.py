"""Model zoo II: SPNet (strip pooling) and CPNet (context prior), and the output keys every
model declares for the model/loss check of ``app.py``.

Sizes at odd inputs, the strip pooling and gating arithmetic, where the SPMs sit, closed-form
parameter counts of each module and of the paper configs, fitting a tiny batch, two steps
through the real app, and the one-line error of a mismatched model and loss.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from segtrain.app import build_model, models_that_fit, train
from segtrain.errors import ConfigError
from segtrain.losses.affinity import AffinityLoss
from segtrain.models.backbones.build import build_backbone
from segtrain.models.cpnet import CPNet
from segtrain.models.modules.context_prior import AggregationModule, ContextPriorLayer
from segtrain.models.modules.strip_pooling import (
    MixedPoolingModule,
    StripPoolingModule,
    strip_pool,
)
from segtrain.models.pspnet import PSPNet
from segtrain.models.spnet import SPNet, insert_strip_pooling
from tests.conftest import CONF_DIR, REPO, TINY, compose_config
from tests.test_models_zoo import SMALL, fit, n_params, tiny_batch

K = 3


# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def small_spnet(dropout: float = 0.1, aux: int = 16) -> SPNet:
    return SPNet(K, "resnet18", 8, None, True, 64, (20, 12), 32, aux, dropout, None)


def small_cpnet(prior_size, dropout: float = 0.1, aux: int = 16) -> CPNet:
    return CPNet(K, "resnet18", 8, 32, prior_size, 11, 32, aux, dropout, None)


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


def test_cpnet_resizes_other_feature_sizes_to_its_prior_grid():
    """A 9x12 feature map against a 4x4 prior grid (whole-image evaluation): pooled to the
    grid, contexts brought back; output still at the input size."""
    model = small_cpnet((4, 4)).train()
    out = model(torch.randn(1, 3, 67, 93))
    assert out["prior"].shape == (1, 16, 16) and out["out"].shape == (1, K, 67, 93)
    with pytest.raises(ConfigError, match="prior_size"):
        small_cpnet((4,))


def test_every_model_declares_what_it_returns_in_training():
    image, _ = tiny_batch()
    models = {name: make() for name, make in SMALL.items()}
    models["pspnet_no_aux"] = PSPNet(K, "mobilenetv2", 8, (1, 2, 3, 6), 64, 0, 0.1, None)
    models["spnet_no_aux"] = small_spnet(aux=0)
    models["cpnet_no_aux"] = small_cpnet((4, 4), aux=0)
    for name, model in models.items():
        out = model.train()(image)
        assert set(out) == model.output_keys, name
        assert model.output_keys <= type(model).TRAIN_KEYS, name


def test_models_that_fit_come_from_the_declarations():
    names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    assert models_that_fit(frozenset({"out"})) == names  # every class declares "out"
    assert models_that_fit(frozenset({"out", "prior"})) == ["cpnet"]
    assert {"pspnet", "spnet", "cpnet"} <= set(models_that_fit(frozenset({"out", "aux"})))
    assert "deeplabv3" not in models_that_fit(frozenset({"out", "aux"}))


# ---- strip pooling ------------------------------------------------------------------------

def test_strip_pooling_of_a_constant_map_is_the_constant():
    x = torch.full((2, 4, 7, 9), 3.25)
    y_h, y_v = strip_pool(x)
    assert y_h.shape == (2, 4, 7, 1) and y_v.shape == (2, 4, 1, 9)
    assert torch.equal(y_h.expand_as(x), x) and torch.equal(y_v.expand_as(x), x)


def test_strip_pooling_is_row_and_column_means_and_expansion_broadcasts():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    y_h, y_v = strip_pool(x)
    a = x[0].numpy()
    assert np.allclose(y_h[0, :, :, 0].numpy(), a.mean(axis=2))  # Eq. (1): 1/W sum_j
    assert np.allclose(y_v[0, :, 0, :].numpy(), a.mean(axis=1))  # Eq. (2): 1/H sum_i
    # Eq. (3) with identity 1-D convolutions: y_ij = y^h_i + y^v_j
    spm = StripPoolingModule(2).double().eval()
    with torch.no_grad():
        for conv in (spm.conv_h, spm.conv_v):
            conv[0].weight.zero_()
            centre = (1, 0) if conv[0].kernel_size == (3, 1) else (0, 1)
            conv[0].weight[range(2), range(2), centre[0], centre[1]] = 1.0
        fused = spm.expand(x)
    expected = a.mean(axis=2)[:, :, None] + a.mean(axis=1)[:, None, :]
    bn_scale = 1 / np.sqrt(1 + 1e-5)  # eval-mode BatchNorm with fresh statistics
    assert np.allclose(fused[0].numpy(), bn_scale * expected)


def test_spm_gates_the_block_output_of_its_3x3_conv():
    """A zero gate removes the residual branch (BN of zero is zero at initialisation): the
    block then returns relu(identity); a gate of one leaves the block unchanged."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet50", 8, None).eval()
    block = backbone.layer4[1]
    x = torch.randn(1, 2048, 5, 5)
    with torch.no_grad():
        plain = block(x)

        class Const(nn.Module):
            def __init__(self, value):
                super().__init__()
                self.value = value

            def forward(self, y):
                return torch.full_like(y, self.value)

        block.gate = Const(1.0)
        assert torch.equal(block(x), plain)
        block.gate = Const(0.0)
        assert torch.equal(block(x), torch.relu(x))


def test_spms_sit_in_the_last_block_of_each_stage_and_all_of_layer4():
    with torch.device("meta"):
        backbone = build_backbone("resnet101", 8, None)
        plain_keys = set(backbone.state_dict())
        chosen = insert_strip_pooling(backbone)
    gated = {name for name, m in backbone.named_modules() if isinstance(m, StripPoolingModule)}
    assert gated == {"layer1.2.gate", "layer2.3.gate", "layer3.22.gate", "layer4.0.gate",
                     "layer4.1.gate", "layer4.2.gate"}
    assert [b.gate.conv_h[0].in_channels for b in chosen] == [64, 128, 256, 512, 512, 512]
    # torchvision keys are untouched: an ImageNet checkpoint still loads
    assert {k for k in backbone.state_dict() if ".gate." not in k} == plain_keys


# ---- parameter counts ---------------------------------------------------------------------

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


def test_module_parameter_counts_closed_form():
    assert n_params(StripPoolingModule(64)) == spm_params(64) == 7 * 64 * 64 + 5 * 64
    assert n_params(MixedPoolingModule(1024, (20, 12))) == mpm_params(1024)
    agg = 9 * 2048 * 512 + 2 * 512 + 4 * (11 * 512 + 512) + 2 * 512
    assert n_params(AggregationModule(2048, 512, 11)) == agg
    n = 64 * 64
    layer = agg + 512 * n + 2 * n + 2 * (512 * 512 + 2 * 512)
    assert n_params(ContextPriorLayer(2048, 512, (64, 64), 11)) == layer


RESNET101 = 42_500_160  # without fc (tests/test_models_zoo.py, PSPNet's count)
# the deep stems replace the 7x7 conv + BN (9,536) by three 3x3 convs + BNs and widen
# layer1's inputs (tests/test_recent_models_references.py derives these by hand)
RESNET101S = RESNET101 + 123_776       # 64-64-128, SPNet's reference
RESNET101_V1C = RESNET101 + 19_232     # 32-32-64, CPNet's reference


def paper_model(name: str, **override) -> nn.Module:
    cfg = compose_config([f"model={name}", "dataset.num_classes=150",
                          *[f"model.{k}={v}" for k, v in override.items()]])
    with torch.device("meta"):
        return build_model(cfg)


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


# ---- fitting a tiny batch -----------------------------------------------------------------

def test_spnet_fits_one_tiny_batch():
    torch.manual_seed(0)
    first, last = fit(small_spnet(dropout=0.0), 40, 1e-2)
    assert last < 0.1 * first, (first, last)


def test_cpnet_fits_one_tiny_batch_with_the_affinity_loss():
    torch.manual_seed(0)
    model = small_cpnet((4, 4), dropout=0.0).train()
    loss_fn = AffinityLoss(255, None, 0.4, (4, 4))
    image, mask = tiny_batch()
    # the sigmoid prior saturates slowly (its BCE falls like 1/steps): a higher rate, and 80
    # steps (60 fell just short once the global term left the diagonal out, as the official
    # code does)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(80):
        terms = loss_fn(model(image), {"mask": mask})
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        losses.append({k: v.item() for k, v in terms.items()})
    assert losses[-1]["total"] < 0.1 * losses[0]["total"], (losses[0], losses[-1])
    assert losses[-1]["unary"] < 0.2 * losses[0]["unary"]
    assert losses[-1]["global"] < 0.2 * losses[0]["global"]


# ---- through the app ------------------------------------------------------------------------

def test_spnet_with_ohem_trains_two_steps_through_the_app(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=spnet", "model.backbone=resnet18", "model.multi_grid=null",
                   "loss=ohem", "loss.min_kept=100", "trainer.max_iters=2",
                   "trainer.eval_interval=2", "dataset.val.num_samples=2")
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_cpnet_with_the_affinity_loss_trains_two_steps_and_logs_its_terms(tiny_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("model=cpnet", "model.backbone=resnet18", "model.prior_size=[4,4]",
                   "loss=affinity", "trainer.max_iters=2", "trainer.eval_interval=2",
                   "trainer.log_interval=1", "dataset.val.num_samples=2")
    assert cfg.loss.prior_size == [4, 4]  # read from the model config
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    tags = set(EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"])
    assert {f"train/loss/{t}" for t in ("ce", "aux", "unary", "global", "total")} <= tags


# ---- the model/loss check ---------------------------------------------------------------

def test_mismatched_model_and_loss_stop_with_one_line(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=deeplabv3_mobilenetv2", "loss=affinity")
    with pytest.raises(ConfigError) as err:
        train(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "model=segtrain.models.deeplabv3.DeepLabV3" in message
    assert "loss=segtrain.losses.affinity.AffinityLoss" in message
    assert "does not return prior" in message and message.endswith("models that fit: cpnet")
    assert not (tmp_path / "checkpoints").exists()


def test_mismatch_names_the_config_options_on_the_command_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "segtrain", *TINY, "model=deeplabv3", "loss=affinity",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert lines, res.stderr
    assert ("model=deeplabv3 does not return prior, which loss=affinity needs; "
            "models that fit: cpnet") in lines[-1]


@pytest.mark.skipif(not (CONF_DIR / "loss" / "dsrl.yaml").exists(),
                    reason="loss=dsrl (branch i7a) is not merged yet")
def test_unet_with_the_dsrl_loss_stops_at_start_up(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=unet", "model.base_channels=4", "loss=dsrl")
    with pytest.raises(ConfigError) as err:
        train(cfg, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "model=segtrain.models.unet.UNet" in message
    assert "loss=" in message and "dsrl" in message.split("models that fit:")[1]
