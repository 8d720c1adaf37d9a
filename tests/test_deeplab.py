"""DeepLab v1 / v2: shapes, parameter counts derived from the papers' layers, protocol."""

import pytest
import torch

from segtrain.models.backbones.vgg import vgg16
from segtrain.models.deeplab import DeepLabV1, DeepLabV2, _transplant_vgg_fc
from segtrain.models.param_groups import KindMult, ParamMults

RATES = {"aspp_s": [2, 4, 8, 12], "aspp_l": [6, 12, 18, 24], "largefov": [12]}


def resnet101_trunk_params() -> int:
    """ResNet-101 without the classifier, from He et al. Table 1 (bottleneck stages 3-4-23-3).

    conv1 7x7x3x64 + BN; each bottleneck: 1x1 (in->p), 3x3 (p->p), 1x1 (p->4p), a BN
    (2 parameters per channel) after each; the first block of a stage adds a 1x1 projection
    (in->4p) with BN.
    """
    total = 7 * 7 * 3 * 64 + 2 * 64
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 23), (512, 3)):
        for b in range(blocks):
            total += inplanes * planes + 9 * planes * planes + planes * 4 * planes
            total += 2 * (planes + planes + 4 * planes)
            if b == 0:
                total += inplanes * 4 * planes + 2 * 4 * planes
            inplanes = 4 * planes
    return total


def test_deeplabv2_resnet101_asppl_parameter_count_from_the_paper():
    # ASPP-L (v2 Fig. 4, ResNet form): four 3x3 atrous convolutions 2048 -> 21 with bias.
    expected = resnet101_trunk_params() + 4 * (2048 * 9 * 21 + 21)
    model = DeepLabV2(21, "resnet101", 8, "aspp_l", RATES)
    assert sum(p.numel() for p in model.parameters()) == expected == 44_048_532


def test_deeplabv1_largefov_parameter_count_matches_paper_table2():
    # v1 Table 2 lists DeepLab-LargeFOV at 20.5M parameters: the 13 VGG-16 convolutions
    # plus fc6 (3x3x512x1024), fc7 (1x1x1024x1024), fc8 (1x1x1024x21).
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    expected = sum(9 * i * o + o for i, o in convs)
    expected += 9 * 512 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 21 + 21
    model = DeepLabV1(21, "vgg16", 8, "largefov", RATES)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected
    assert round(n / 1e6, 1) == 20.5


@pytest.mark.parametrize("head, branches", [("aspp_s", 4), ("aspp_l", 4), ("largefov", 1)])
def test_head_option_selects_rates(head, branches):
    model = DeepLabV2(5, "resnet18", 8, head, RATES)
    assert len(model.head.branches) == branches
    rates = [b.layers[0].dilation[0] for b in model.head.branches]
    assert rates == RATES[head]


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (33, 47)])
def test_output_equals_input_size_for_odd_sizes(size):
    model = DeepLabV2(21, "resnet101", 8, "aspp_l", RATES).eval()
    out = model(torch.randn(1, 3, *size))["out"]
    assert out.shape == (1, 21, *size)


def test_deeplabv1_output_shape_odd_size():
    model = DeepLabV1(21, "vgg16", 8, "largefov", RATES).eval()
    assert model(torch.randn(1, 3, 97, 131))["out"].shape == (1, 21, 97, 131)


def test_param_groups_follow_the_deeplab_protocol():
    model = DeepLabV2(21, "resnet18", 8, "aspp_s", RATES)
    mults = ParamMults(KindMult(2, 0), KindMult(1, 0), KindMult(1, 0))
    groups = {g["name"]: g for g in model.param_groups(mults)}
    assert groups["backbone"]["lr_mult"] == 1.0
    assert groups["head"]["lr_mult"] == 10.0 and groups["head_bias"]["lr_mult"] == 20.0
    assert groups["head_bias"]["weight_decay_mult"] == 0.0
    assert groups["backbone_norm_bias"]["weight_decay_mult"] == 0.0
    n_groups = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n_groups == sum(p.numel() for p in model.parameters())


def test_freeze_bn_keeps_statistics_and_weights_fixed_in_train_mode():
    model = DeepLabV2(3, "resnet18", 8, "largefov", RATES, freeze_bn=True).train()
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, model.backbone.bn1.running_mean)
    assert not model.backbone.bn1.weight.requires_grad
    assert all(p["name"] != "backbone_bias" or all(q.requires_grad for q in p["params"])
               for p in model.param_groups())


def test_vgg_fc_layers_are_decimated_into_fc6_fc7():
    backbone = vgg16(output_stride=8)
    model = DeepLabV1(21, "vgg16", 8, "largefov", RATES)
    branch = model.head.branches[0]
    _transplant_vgg_fc(backbone, branch)
    fc6 = backbone.classifier[0].weight.view(4096, 512, 7, 7)
    assert torch.equal(branch.layers[0].weight[5], fc6[20][:, ::3, ::3])
    assert torch.equal(branch.layers[3].weight[7, 9, 0, 0], backbone.classifier[3].weight[28, 36])


def test_unknown_head_is_a_clear_error():
    with pytest.raises(ValueError, match="model.head='aspp_x'"):
        DeepLabV2(21, "resnet18", 8, "aspp_x", RATES)


def test_deeplabv2_plain_head_is_table4_baseline_one_1x1_classifier(tmp_path):
    """model.head=plain (DeepLab v2 TABLE 4 rows 1-2, ResNet-101 without LargeFOV/ASPP):
    the composed config builds ResNet-101 + one 1x1 classifier 2048 -> 21 with bias."""
    from hydra import compose, initialize_config_dir

    from segtrain import app
    from segtrain.reproduce import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=deeplabv2", "model.head=plain",
                                           "dataset.num_classes=21"])
    with torch.device("meta"):
        model = app.build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == \
        resnet101_trunk_params() + 2048 * 21 + 21 == 42_543_189
    (branch,) = model.head.branches
    assert branch.classifier.kernel_size == (1, 1) and branch.classifier.dilation == (1, 1)
    small = DeepLabV2(21, "resnet18", 8, "plain", {**RATES, "plain": []}).train()
    out = small(torch.randn(2, 3, 65, 81))
    assert out["out"].shape == (2, 21, 65, 81) and out["out_lowres"].shape == (2, 21, 9, 11)


def test_plain_head_is_refused_on_vgg16():
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="model.head=plain"):
        DeepLabV2(21, "vgg16", 8, "plain", {**RATES, "plain": []})
