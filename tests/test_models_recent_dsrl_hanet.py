"""Model zoo II, part one: DSRL (Wang et al., CVPR 2020) with its loss, and HANet (Choi et
al., CVPR 2020).

Logits at the input size for odd sizes; DSRL's eval mode runs the segmentation path only
(hooks, MACs, the same output as DeepLab v3+ + SSSR); the FA loss against hand-computed
values; HANet's attention per (channel, row) and its positional encoding against the
closed form; parameter counts derived by hand; each model fits a tiny batch and trains two
steps through the app.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
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
from segtrain.models.hanet import HANet
from segtrain.models.modules.height_attention import HeightAttention, positional_encoding
from tests.conftest import plain_groups
from tests.test_models_zoo import tiny_batch

CONF = Path(__file__).resolve().parents[1] / "conf"
K = 3
ODD_SIZES = [(33, 47), (65, 63)]
ALL_STAGES = ["layer1", "layer2", "layer3", "layer4", "layer5"]


# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


def small_dsrl(sr_factor: int = 2, dropout: float = 0.1) -> DSRL:
    return DSRL(K, "mobilenetv2", 16, None, (6, 12, 18), dropout, True, 48, 64, sr_factor, 32,
                None)


def small_hanet(attach=("layer1", "layer2", "layer3", "layer4"), aux: int | None = 32,
                backbone: str = "resnet18", dropout: float = 0.1) -> HANet:
    # the reference's dilation layout (every block of layer3 / layer4 dilated) needs a ResNet
    contract = not backbone.startswith("resnet")
    return HANet(K, backbone, 8, None, contract, (6, 12, 18), 0.0, False, 48, 64, list(attach),
                 16, 64, 3, dropout, 100.0, aux, dropout, None)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def test_hanet_aux_output_follows_config():
    assert small_hanet(aux=None).output_keys == {"out"}
    model = small_hanet(aux=16)
    assert model.output_keys == {"out", "aux"}
    # the auxiliary logits stay at stride 8, ceil(33 / 8) x ceil(35 / 8), as the reference's
    assert model.train()(torch.randn(2, 3, 33, 35))["aux"].shape == (2, K, 5, 5)


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
    tests/test_recent_models_references.py)."""
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
    with pytest.raises(ConfigError, match="model.attach"):
        small_hanet(attach=("layer1", "layer6"))


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


# ---- HANet --------------------------------------------------------------------------------

def test_hanet_attention_one_value_per_channel_and_row_constant_along_width():
    torch.manual_seed(0)
    module = HeightAttention(12, 7, 16, 4, 3, 0.0).eval()
    low = torch.randn(2, 12, 20, 9)
    high = torch.randn(2, 7, 10, 13)
    with torch.no_grad():
        a = module.attention(low, 10)
        out = module(low, high)
        ones = module(low, torch.ones_like(high))
    assert a.shape == (2, 7, 10)  # (batch, channel, row)
    assert ((a > 0) & (a < 1)).all()
    assert torch.equal(ones, ones[..., :1].expand_as(ones))  # constant along the width
    assert torch.allclose(ones[..., 0], a)
    assert torch.allclose(out, high * a[..., None])
    assert a.std(dim=2).mean() > 0  # rows differ
    # the attention depends on the lower-level map's rows only through width-wise pooling
    with torch.no_grad():
        shuffled = module.attention(low[..., torch.randperm(9)], 10)
    assert torch.allclose(shuffled, a, atol=1e-6)


def test_positional_encoding_matches_closed_form():
    length, channels, base = 16, 6, 100.0
    pe = positional_encoding(length, channels, base).numpy()
    ref = np.zeros((channels, length))
    for p in range(length):
        for i in range(channels // 2):
            ref[2 * i, p] = math.sin(p / base ** (2 * i / channels))
            ref[2 * i + 1, p] = math.cos(p / base ** (2 * i / channels))
    assert np.allclose(pe, ref, atol=1e-6)
    assert positional_encoding(5, 7, 100.0).shape == (7, 5)  # odd width: the last is a sine


def test_positional_encoding_is_added_after_the_first_convolution():
    torch.manual_seed(0)
    module = HeightAttention(64, 8, 16, 8, 3, 0.0).eval()
    seen = {}
    hooks = [module.conv1.register_forward_hook(lambda m, i, o: seen.update(q1=o.clone())),
             module.conv2.register_forward_hook(lambda m, i, o: seen.update(q2_in=i[0]))]
    with torch.no_grad():
        module.attention(torch.randn(1, 64, 32, 5), 32)
    for h in hooks:
        h.remove()
    assert module.pe.shape == (8, 17)  # ceil(64 / 8) channels, coarse rows 0..16
    assert torch.allclose(seen["q2_in"], seen["q1"] + module.pe[:, :16])


def reference_encoding_table(rows: int, width: int) -> np.ndarray:
    """shachoi/HANet network/PosEmbedding.py: get_sinusoid_encoding_table(rows, width) + 1
    (PosEncoding1D), wavelength base 100 for widths up to 50, as (width, rows)."""
    base = 10 if width > 50 else 100
    angle = np.array([[p / base ** (2 * (j // 2) / width) for j in range(width)]
                      for p in range(rows)])
    angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    return (angle + 1).T


def test_hanet_config_adds_the_reference_encoding_table():
    """The configured model adds sinusoid + 1 after the first conv, as the reference code
    (the +1 changes the logits: scripts/reference/compare_hanet.py, docs/reference/hanet.md)."""
    cfg = OmegaConf.load(CONF / "model" / "hanet.yaml")
    cfg.pop("defaults")  # the optimizer policy it picks, not a constructor argument
    cfg.num_classes, cfg.backbone = K, "resnet18"
    model = instantiate(cfg)
    for module in model.attention.values():
        width = module.conv1[0].out_channels
        assert np.allclose(module.pe.numpy(), reference_encoding_table(17, width), atol=1e-6)
    assert np.allclose(HeightAttention(64, 8, 16, 8, 3, 0.0, pe_offset=0.0).pe.numpy(),
                       reference_encoding_table(17, 8) - 1, atol=1e-6)  # the paper's PE


def height_attention_params(c_low: int, c_high: int, r: int, k: int) -> int:
    """By hand: 1x1 conv (no bias) + BN, 3x3 conv to 2m (no bias) + BN, k conv with bias."""
    m = math.ceil(c_low / r)
    return c_low * m + 2 * m + m * 2 * m * 3 + 2 * 2 * m + 2 * m * c_high * k + c_high


def test_hanet_parameter_count_by_hand():
    assert n_params(HeightAttention(1024, 2048, 16, 64, 3, 0.1)) == 216_672
    assert height_attention_params(1024, 2048, 64, 3) == 216_672
    cfg = OmegaConf.load(CONF / "model" / "hanet.yaml")
    cfg.pop("defaults")  # the optimizer policy it picks, not a constructor argument
    cfg.num_classes = 19
    with torch.device("meta"):
        model = instantiate(cfg)
        plain = DeepLabV3Plus(19, "resnet101s", 8, None, (6, 12, 18), 0.0, False, 48, 256,
                              None)
    # the paper's best model: layer1-4 on ResNet-101 (deep stem; c4 1024, c5 2048, ASPP
    # 5 x 256)
    hanet = (height_attention_params(1024, 2048, 64, 3)
             + height_attention_params(2048, 1280, 64, 3)
             + height_attention_params(1280, 256, 64, 3)
             + height_attention_params(304, 256, 64, 3))
    aux = 1024 * 512 * 9 + 2 * 512 + 512 * 19 + 19
    assert n_params(model.attention) == hanet == 604_316
    assert n_params(model) == n_params(plain) + hanet + aux


def test_dsrl_parameter_count_by_hand():
    """DSRL = DeepLab v3+ + SSSR deconv (K*K*16) + SISR decoder + 1x1 feature transform."""
    cfg = OmegaConf.load(CONF / "model" / "dsrl.yaml")
    cfg.pop("defaults")  # the optimizer policy it picks, not a constructor argument
    cfg.num_classes = 19
    with torch.device("meta"):
        model = instantiate(cfg)
        plain = DeepLabV3Plus(19, "resnet101", 16, None, (6, 12, 18), 0.1, False, 48, 256,
                              None)
    c = cfg.sr_channels
    sisr = (256 * 48 + 2 * 48) + (304 * c * 9 + 2 * c) + (c * c * 9 + 2 * c) \
        + (c * 3 * 64 * 9 + 3 * 64)  # sub-pixel conv to 3 x (4 x 2)^2 channels
    assert n_params(model.sisr) == sisr
    assert n_params(model) == n_params(plain) + 19 * 19 * 16 + sisr + (3 * 19 + 19)


def test_param_groups_cover_every_parameter():
    for model in (small_dsrl(), small_hanet()):
        groups = plain_groups(model)
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
    from segtrain.app import train

    cfg = tiny_cfg(*overrides, "trainer.max_iters=2", "trainer.eval_interval=2",
                   "dataset.val.num_samples=2", "lr=step", "loss.class_weights=[1,2,1,1,1,1]")
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set(EventAccumulator(str(tmp_path / "tb")).Reload().Tags()["scalars"])
    terms = {"ce", "sr", "fa", "total"} if "loss=dsrl" in overrides else {"ce", "aux", "total"}
    assert {f"train/loss/{t}" for t in terms} <= scalars, scalars
