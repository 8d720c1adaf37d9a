"""Networks built from shared parts: HANet is the atrous encoder, DeepLab v3+'s decoder parts
and its attention modules (its state_dict keys are v3+'s plus its own, so checkpoints and the
copied-weights comparisons load unchanged); one frozen-BatchNorm switch for every network;
the multi-scale wrapper's per-scale logits as a mapping; dataset item options as constructor
arguments."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn

from segtrain import app
from segtrain.data.synthetic import SyntheticShapes
from segtrain.data.transforms import compose
from segtrain.models.deeplab import DeepLabV2
from segtrain.models.deeplabv3 import DeepLabV3, DeepLabV3Plus
from segtrain.models.hanet import HANet
from tests.conftest import compose_config

K = 5
V3PLUS_ARGS = dict(num_classes=K, backbone="resnet18", output_stride=8, multi_grid=None,
                   atrous_rates=(6, 12, 18), aspp_dropout=0.0, separable=False,
                   low_level_channels=48, decoder_channels=64, pretrained=None)


def _hanet(attach, aux) -> HANet:
    return HANet(contract_dilation=True, attach=attach, coarse_height=16, reduction=64,
                 kernel_size=3, hanet_dropout=0.0, pe_base=100.0, aux_channels=aux,
                 aux_dropout=0.0, **V3PLUS_ARGS)


def test_hanet_state_dict_is_deeplabv3plus_keys_then_its_own():
    with torch.device("meta"):
        plus, hanet = DeepLabV3Plus(**V3PLUS_ARGS), _hanet(["layer1", "layer4"], 32)
    shapes = {k: v.shape for k, v in hanet.state_dict().items()}
    keys = list(shapes)
    base = list(plus.state_dict())
    assert keys[:len(base)] == base  # same names, same order (optimizer states)
    assert all(shapes[k] == v.shape for k, v in plus.state_dict().items())
    own = {".".join(k.split(".")[:2]) if k.startswith("attention.") else k.split(".")[0]
           for k in keys[len(base):]}
    assert own == {"attention.layer1", "attention.layer4", "aux_head"}


def test_hanet_without_attention_is_deeplabv3plus_with_the_same_weights():
    torch.manual_seed(0)
    plus = DeepLabV3Plus(**V3PLUS_ARGS).eval()
    hanet = _hanet([], None).eval()
    hanet.load_state_dict(plus.state_dict(), strict=True)
    image = torch.randn(2, 3, 41, 57)
    with torch.no_grad():
        torch.testing.assert_close(hanet(image)["out"], plus(image)["out"], rtol=0, atol=0)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_freeze_bn_fixes_every_batchnorm_of_deeplab_v2_and_v3_in_training():
    torch.manual_seed(0)
    models = [DeepLabV2(K, "resnet18", 8, "largefov", {"largefov": [12]}, freeze_bn=True),
              DeepLabV3(K, "resnet18", 16, None, (6, 12, 18), 0.0, None, freeze_bn=True)]
    for model in models:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        model(torch.randn(2, 3, 33, 33))
        norms = _batchnorms(model)
        assert norms and all(not m.training for m in norms)
        assert all(not p.requires_grad for m in norms for p in m.parameters())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert any(p.requires_grad for p in model.parameters())  # the rest still learns


def test_msc_per_scale_logits_are_a_mapping_the_loss_reads():
    cfg = compose_config(["model.msc.train_scales=[1.0,0.5]", "dataset.num_classes=5"])
    model = app.build_model(cfg).train()
    outputs = model(torch.randn(1, 3, 32, 32))
    assert list(outputs["scales"]) == [1.0, 0.5]
    assert outputs["scales"][0.5]["out"].shape[-2:] == (16, 16)
    terms = instantiate(cfg.loss)(outputs, {"mask": torch.zeros(1, 32, 32, dtype=torch.long)})
    assert {"ce_s1", "ce_s0.5"} <= set(terms)


def test_dataset_item_options_are_constructor_arguments():
    def pipeline():  # a flip: the kept rgb and rows follow it like the mask
        return compose([A.HorizontalFlip(p=1.0), A.Normalize(mean=[0, 0, 0], std=[1, 1, 1])])

    kwargs = dict(split="val", num_samples=1, image_size=24)
    plain = SyntheticShapes(**kwargs, transforms=pipeline())[0]
    kept = SyntheticShapes(**kwargs, transforms=pipeline(), keep_rgb=True, keep_rows=True)[0]
    assert "rgb" not in plain and "rows" not in plain
    assert kept["rgb"].dtype == torch.uint8 and kept["rgb"].shape == (24, 24, 3)
    shown = (kept["image"].permute(1, 2, 0) * 255).round().to(torch.uint8)
    assert torch.equal(kept["rgb"], shown)  # the flipped image as read
    assert torch.equal(kept["rows"][:, 0], torch.arange(24) / 24)
    assert np.array_equal(kept["mask"].numpy(), plain["mask"].numpy())
    cfg = compose_config(["dataset.image_size=24", "dataset.val.num_samples=1"])
    assert "rgb" in app.build_val_set(cfg)[0]  # the evaluation set, as built for a run
