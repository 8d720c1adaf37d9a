"""SPNet (Hou et al., "Strip Pooling", CVPR 2020): strip pooling and its gating
arithmetic, bias-free strip convolutions, where the SPMs sit, fitting a tiny batch and two
steps with OHEM through the app.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from segtrain.app import train
from segtrain.models.backbones.build import build_backbone
from segtrain.models.modules.strip_pooling import (
    StripPoolingModule,
    strip_pool,
)
from segtrain.models.spnet import SPNet, insert_strip_pooling
from tests.test_models_zoo import fit, n_params

K = 3

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def small_spnet(dropout: float = 0.1, aux: int = 16) -> SPNet:
    return SPNet(K, "resnet18", 8, None, True, 64, (20, 12), 32, aux, dropout, None)


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


# ---- fitting a tiny batch -----------------------------------------------------------------

@pytest.mark.slow  # 40 steps of a ResNet-18 SPNet: 15 s on an idle machine
def test_spnet_fits_one_tiny_batch():
    torch.manual_seed(0)
    first, last = fit(small_spnet(dropout=0.0), 40, 1e-2)
    assert last < 0.1 * first, (first, last)


# ---- through the app ------------------------------------------------------------------------

def test_spnet_with_ohem_trains_two_steps_through_the_app(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=spnet", "model.backbone=resnet18", "model.multi_grid=null",
                   "loss=ohem", "loss.min_kept=100", "trainer.max_iters=2",
                   "trainer.eval_interval=2", "dataset.val.num_samples=2")
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


# ---- strip convolutions---------------------------------------------------------------------

def test_strip_pooling_convolutions_have_no_bias():
    spm = StripPoolingModule(16)
    assert spm.conv_h[0].bias is None and spm.conv_v[0].bias is None
    assert spm.fuse.bias is not None
    # 3-tap convs without bias + BN on both strips, 1x1 fuse with bias
    assert n_params(spm) == 2 * (3 * 16 * 16 + 2 * 16) + 16 * 16 + 16
