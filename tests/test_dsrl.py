"""DSRL (Wang et al., "Dual Super-Resolution Learning for Semantic Segmentation", CVPR
2020): the training outputs and the downsampled input, an evaluation that runs the
segmentation path only (hooks, MACs), SSSR starting as bilinear upsampling and its
deconvolution at the border, the FA loss against hand-computed values, the loss terms and
their config, the parameter count derived by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from segtrain.errors import ConfigError
from segtrain.losses.ce import CrossEntropyLoss
from segtrain.losses.dsrl import DSRLLoss, feature_affinity_loss, similarity_matrix
from segtrain.models.deeplabv3 import DeepLabV3Plus
from segtrain.models.dsrl import DSRL
from tests.conftest import model_from_yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
K = 3

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def small_dsrl(sr_factor: int = 2, dropout: float = 0.1) -> DSRL:
    return DSRL(K, "mobilenetv2", 16, None, (6, 12, 18), dropout, True, 48, 64, sr_factor, 32,
                None)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, set[int]]:
    """Multiply-adds of every conv / transposed conv, and the ids of the parameters used."""
    total, used = 0, set()

    def hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, nn.ConvTranspose2d):
            total += inputs[0].numel() * module.out_channels // module.groups * k
        else:
            total += output.numel() * module.in_channels // module.groups * k

    def mark(module, inputs, output):
        used.update(id(p) for p in module.parameters(recurse=False))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    hooks += [m.register_forward_hook(mark) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total, used


def test_dsrl_training_outputs():
    model = small_dsrl().train()
    assert model.output_keys == {"out", "sr", "fa_seg", "fa_sr"}
    out = model(torch.randn(2, 3, 33, 47))
    assert out["sr"].shape == (2, 3, 33, 47)  # the full-resolution image, 3 channels
    assert out["fa_seg"].shape == out["fa_sr"].shape == (2, K, 33, 47)
    four = DSRL(K, "mobilenetv2", 16, None, (), 0.1, True, 48, 64, 2, 16, None, in_channels=4)
    assert four.train()(torch.randn(2, 4, 32, 32))["sr"].shape == (2, 4, 32, 32)


def test_dsrl_network_sees_the_downsampled_image():
    model = small_dsrl().eval()
    seen = {}
    stem = model.backbone.features[0]
    hook = stem.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 66)
        model(x)
    hook.remove()
    assert seen["x"].shape == (1, 3, 32, 33)
    # area interpolation by a factor dividing the size: the mean of each 2x2 block
    assert torch.allclose(seen["x"], F.avg_pool2d(x, 2), atol=1e-5)


# ---- DSRL inference = the segmentation path ----------------------------------------------

def test_dsrl_eval_runs_no_sisr_module_and_no_feature_transform():
    model = small_dsrl()
    fired: list[str] = []
    extra = [("sisr." + n, m) for n, m in model.sisr.named_modules()] + \
        [("feature_transform", model.feature_transform)]
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: fired.append(n)) for n, m in extra]
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        model.eval()(x)
        assert fired == []
        model.train()(x)  # the hooks do fire when the modules run
    for h in hooks:
        h.remove()
    assert "sisr.shuffle" in fired and "feature_transform" in fired


def test_dsrl_inference_cost_equals_the_segmentation_path():
    """Eval-mode DSRL = DeepLab v3+ on the half-size image + the SSSR deconvolution: same
    output, the same conv MACs (plus the deconv's, by hand), no SISR/FA parameter used."""
    torch.manual_seed(0)
    dsrl = small_dsrl().eval()
    plain = DeepLabV3Plus(K, "mobilenetv2", 16, None, (6, 12, 18), 0.1, True, 48, 64,
                          None).eval()
    missing, unexpected = plain.load_state_dict(dsrl.state_dict(), strict=False)
    assert not missing
    assert {k.split(".")[0] for k in unexpected} == {"sssr", "sisr", "feature_transform"}
    x = torch.randn(1, 3, 64, 96)
    small = F.avg_pool2d(x, 2)
    dsrl_macs, used = conv_macs(dsrl, x)
    plain_macs, _ = conv_macs(plain, small)
    deconv = 32 * 48 * K * K * 4 * 4  # ConvTranspose2d(K, K, 4): input pixels x K x K x 16
    assert dsrl_macs == plain_macs + deconv
    extra = {id(p) for m in (dsrl.sisr, dsrl.feature_transform) for p in m.parameters()}
    assert not used & extra
    assert used | extra == {id(p) for p in dsrl.parameters()}
    with torch.no_grad():
        expected = dsrl.sssr(plain(small)["out"])
        assert torch.allclose(dsrl(x)["out"], expected, atol=1e-5)


def test_sssr_starts_as_bilinear_upsampling():
    """The 2x deconvolution starts with the bilinear kernel: bilinear interpolation away
    from the border, where the deconvolution sees zero padding (the border itself:
    test_dsrl_deconvolution_is_bilinear_except_on_the_border below)."""
    model = small_dsrl()
    x = torch.randn(1, K, 6, 7)
    with torch.no_grad():
        y = model.sssr(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert y.shape == ref.shape
    assert torch.allclose(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6)


def test_dsrl_config_errors():
    with pytest.raises(ConfigError, match="model.sr_factor"):
        small_dsrl(sr_factor=3)
    with pytest.raises(ConfigError, match="loss.fa_pool"):
        DSRLLoss(fa_pool=0)


# ---- the DSRL loss ------------------------------------------------------------------------

def test_fa_loss_zero_for_identical_features_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 5, 12, 10, generator=g)
    assert feature_affinity_loss(f, f.clone(), 2) == 0
    # Eq. 1 normalises every pixel: a positive per-pixel scale changes nothing
    scale = torch.rand(2, 1, 12, 10, generator=g) + 0.5
    assert feature_affinity_loss(f, f * scale, 1) < 1e-6
    assert feature_affinity_loss(f, torch.randn(2, 5, 12, 10, generator=g), 2) > 0.05


def test_fa_loss_is_float32_under_mixed_precision():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 16, 16, generator=g)
    exact = feature_affinity_loss(a, b, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = feature_affinity_loss(a, b, 2)
        half = feature_affinity_loss(a.bfloat16(), b.bfloat16(), 2)
    # autocast would run the similarity matmuls in bf16 (an error near 1e-3 here)
    assert mixed.dtype == half.dtype == torch.float32
    assert abs(mixed.item() - exact.item()) < 1e-6


def test_fa_loss_by_hand():
    """Two pixels, pool 1. seg: orthogonal unit vectors, S = I; sr: parallel, S = ones:
    |S_seg - S_sr| = [[0, 1], [1, 0]], mean 0.5 (Eq. 2 with q = 1)."""
    seg = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).view(1, 2, 1, 2)
    sr = torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    assert torch.allclose(similarity_matrix(seg, 1), torch.eye(2)[None])
    assert feature_affinity_loss(seg, sr, 1).item() == pytest.approx(0.5)
    # pooling 2x2 blocks first: a 4x4 map becomes 2x2, S is 4x4
    assert similarity_matrix(torch.randn(1, 3, 4, 4), 2).shape == (1, 4, 4)
    assert similarity_matrix(torch.randn(1, 3, 5, 3), 4).shape == (1, 2, 2)


def test_dsrl_loss_terms_weights_and_class_weights():
    torch.manual_seed(0)
    out = {"out": torch.randn(2, K, 8, 8), "aux": torch.randn(2, K, 8, 8),
           "sr": torch.randn(2, 3, 8, 8), "fa_seg": torch.randn(2, K, 8, 8),
           "fa_sr": torch.randn(2, K, 8, 8)}
    batch = {"image": torch.randn(2, 3, 8, 8), "mask": torch.randint(0, K, (2, 8, 8))}
    batch["mask"][0, 0] = 255
    loss = DSRLLoss(255, None, 0.4, 0.1, 1.0, 2)
    assert DSRLLoss.required_keys == {"out", "sr", "fa_seg", "fa_sr"}
    terms = loss(out, batch)
    assert set(terms) == {"ce", "aux", "sr", "fa", "total"}
    ce = CrossEntropyLoss(255, None, 0.4)(out, batch)
    assert torch.equal(terms["ce"], ce["ce"]) and torch.equal(terms["aux"], ce["aux"])
    assert torch.allclose(terms["sr"], ((out["sr"] - batch["image"]) ** 2).mean())
    assert torch.allclose(terms["fa"], feature_affinity_loss(out["fa_seg"], out["fa_sr"], 2))
    expected = ce["total"] + 0.1 * terms["sr"] + 1.0 * terms["fa"]
    assert torch.allclose(terms["total"], expected)
    weighted = DSRLLoss(255, [1.0, 5.0, 0.2], 0.4, 0.1, 1.0, 2)(out, batch)
    assert not torch.allclose(weighted["ce"], terms["ce"])
    assert torch.equal(weighted["sr"], terms["sr"])


def test_dsrl_loss_config_composes_with_paper_weights():
    cfg = OmegaConf.load(CONF / "loss" / "dsrl.yaml")
    assert (cfg.sr_weight, cfg.fa_weight) == (0.1, 1.0)
    cfg.ignore_index = 255
    loss = instantiate(cfg, class_weights=[1.0, 2.0, 3.0])
    assert loss.weight.tolist() == [1.0, 2.0, 3.0]


def test_dsrl_parameter_count_by_hand():
    """DSRL = DeepLab v3+ + SSSR deconv (K*K*16) + SISR decoder + 1x1 feature transform."""
    with torch.device("meta"):
        model = model_from_yaml("dsrl", 19)
        plain = DeepLabV3Plus(19, "resnet101", 16, None, (6, 12, 18), 0.1, False, 48, 256,
                              None)
    c = OmegaConf.load(CONF / "model" / "dsrl.yaml").sr_channels
    sisr = (256 * 48 + 2 * 48) + (304 * c * 9 + 2 * c) + (c * c * 9 + 2 * c) \
        + (c * 3 * 64 * 9 + 3 * 64)  # sub-pixel conv to 3 x (4 x 2)^2 channels
    assert n_params(model.sisr) == sisr
    assert n_params(model) == n_params(plain) + 19 * 19 * 16 + sisr + (3 * 19 + 19)


def test_dsrl_deconvolution_is_bilinear_except_on_the_border():
    from segtrain.models.dsrl import SSSRUpsampler

    x = torch.rand(1, 2, 5, 6) + 0.5
    with torch.no_grad():
        y = SSSRUpsampler(2, 2)(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(y[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-6)
    # outermost rows and columns: zero padding instead of the repeated edge
    assert torch.allclose(y[..., 0, 1:-1], 0.75 * ref[..., 0, 1:-1], atol=1e-6)
    assert torch.allclose(y[..., 1:-1, -1], 0.75 * ref[..., 1:-1, -1], atol=1e-6)
    assert torch.allclose(y[..., 0, 0], 0.5625 * x[..., 0, 0], atol=1e-6)
