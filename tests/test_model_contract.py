"""The model contract (segtrain/models/base.py) holds for every conf/model option as written,
for the multi-scale wrapper, and is what the app, the evaluator and the trainer rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_config
from torch import nn

from segtrain import app
from segtrain.data.loader import eval_loader
from segtrain.engine.trainer import Trainer
from segtrain.errors import ConfigError
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.inference import Inference, Predictor
from segtrain.models.base import SegmentationModel, bare
from segtrain.models.deeplab import DeepLabV2
from segtrain.models.deeplabv3 import DeepLabV3
from segtrain.models.msc import MultiScaleInputs
from segtrain.models.pspnet import PSPNet

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
K = 3
RATES = {"largefov": [12], "aspp_s": [2, 4, 8, 12]}


def _built(name: str) -> tuple[SegmentationModel, object]:
    """The option as written (its real backbone and widths), on the meta device: shapes and
    keys without the cost of the numbers."""
    extra = ["model.prior_size=[8,8]"] if name == "cpnet" else []  # 64 / output stride 8
    cfg = compose_config([f"model={name}", f"dataset.num_classes={K}", *extra])
    with torch.device("meta"):
        return app.build_model(cfg), cfg


@pytest.mark.parametrize("name", MODELS)
def test_every_model_option_returns_what_it_declares_in_each_mode(name):
    model, cfg = _built(name)
    assert isinstance(model, SegmentationModel), name
    x = torch.empty(2, 3, 64, 64, device="meta")
    train = model.train()(x)
    assert set(train) == model.output_keys == model.train_keys, name
    assert model.train_keys <= type(model).TRAIN_KEYS and "out" in model.train_keys
    assert train["out"].shape == (2, K, 64, 64)
    evaluated = model.eval()(x)
    assert set(evaluated) == model.output_keys == type(model).EVAL_KEYS == {"out"}, name
    assert evaluated["out"].shape == (2, K, 64, 64)
    # the optimizer groups hold every trainable parameter exactly once
    ids = [id(p) for g in model.param_groups() for p in g["params"]]
    assert len(ids) == len(set(ids)), name
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}, name
    # the configured output stride is the model's (None: an encoder-decoder without one)
    assert model.output_stride == cfg.model.get("output_stride"), name


@pytest.mark.parametrize("name", MODELS)
def test_set_output_stride_works_where_declared_and_is_a_config_error_elsewhere(name):
    model, cfg = _built(name)
    trained = model.output_stride
    other = 8 if trained == 16 else 16
    if not model.CAN_SET_OUTPUT_STRIDE:
        with pytest.raises(ConfigError, match=f"{type(model).__name__} cannot change its "
                                              f"output stride"):
            model.set_output_stride(other)
        assert model.output_stride == trained
        return
    with torch.device("meta"):
        model.set_output_stride(other)
    assert model.output_stride == other
    assert model.eval()(torch.empty(1, 3, 64, 64, device="meta"))["out"].shape == (1, K, 64, 64)


def test_models_without_an_optional_head_leave_its_key_out():
    model = PSPNet(K, "mobilenetv2", 8, (1, 2), 16, 0, 0.1, None)  # aux_channels=0
    assert model.train_keys == {"out"} and PSPNet.TRAIN_KEYS == {"out", "aux"}
    assert set(model.train()(torch.randn(2, 3, 32, 32))) == {"out"}


def test_msc_wrapper_declares_its_per_scale_keys_and_delegates_the_rest():
    torch.manual_seed(0)
    net = DeepLabV2(K, "resnet18", 8, "largefov", RATES)
    wrapped = MultiScaleInputs(net, [1.0, 0.5])
    out = wrapped.train()(torch.randn(2, 3, 33, 41))
    assert set(out) == wrapped.output_keys == {"out", "out_lowres", "scales"}
    assert list(out["scales"]) == [1.0, 0.5]
    assert all(set(per_scale) == {"out", "out_lowres"} for per_scale in out["scales"].values())
    assert out["scales"][0.5]["out"].shape[-2:] == (16, 20)
    wrapped.eval()
    with torch.no_grad():
        assert set(wrapped(torch.randn(1, 3, 33, 41))) == wrapped.output_keys == {"out"}
    assert [[id(p) for p in g["params"]] for g in wrapped.param_groups()] == \
        [[id(p) for p in g["params"]] for g in net.param_groups()]
    # DeepLab v2 cannot change its output stride, through the wrapper neither
    assert not wrapped.CAN_SET_OUTPUT_STRIDE and wrapped.output_stride == 8
    with pytest.raises(ConfigError, match="DeepLabV2 cannot change its output stride"):
        wrapped.set_output_stride(16)
    v3 = MultiScaleInputs(DeepLabV3(K, "resnet18", 16, None, (6, 12, 18), 0.1, None), [1.0])
    assert v3.CAN_SET_OUTPUT_STRIDE
    v3.set_output_stride(8)
    assert v3.output_stride == v3.model.output_stride == 8
    with pytest.raises(TypeError, match="SegmentationModel"):
        MultiScaleInputs(nn.Conv2d(3, K, 1), [1.0])


def test_the_app_refuses_a_class_outside_the_contract_and_a_loss_it_cannot_feed():
    cfg = compose_config(["model._target_=torch.nn.Identity"])
    with pytest.raises(ConfigError, match="model._target_=torch.nn.Identity is not a "
                                          "segtrain.models.base.SegmentationModel"):
        app.build_model(cfg)

    class NeedsAux:
        required_keys = frozenset({"out", "aux"})

    cfg = compose_config(["model=pspnet", "model.backbone=resnet18", "model.aux_channels=0",
                          "dataset.num_classes=3"])
    model = app.build_model(cfg)
    with pytest.raises(ConfigError, match=r"does not return aux.* models that fit: .*pspnet"):
        app.check_outputs(cfg, model, NeedsAux())
    assert "deeplabv3" not in app.models_that_fit(NeedsAux.required_keys)


def test_eval_output_stride_on_a_module_outside_the_contract_is_a_config_error():
    plain = nn.Conv2d(3, K, 1)  # returns no dict and declares nothing
    evaluator = Evaluator(eval_loader([], num_workers=0), K, 255, ["a", "b", "c"],
                          Inference(Predictor(), output_stride=8))
    with pytest.raises(ConfigError, match="eval.output_stride=8: Conv2d cannot change"):
        evaluator.check_model(plain)


def test_bare_finds_the_checkpointed_model_under_ddp(tmp_path: Path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        wrapped = MultiScaleInputs(DeepLabV3(K, "resnet18", 16, None, (6, 12, 18), 0.1, None),
                                   [1.0, 0.5])
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        assert bare(ddp) is wrapped and bare(wrapped) is wrapped
        # the checkpoint's keys: those the evaluation rebuilds (the wrapper's, not DDP's)
        assert all(k.startswith("model.") for k in bare(ddp).state_dict())
        # the trainer saves exactly that state
        trainer = Trainer(ddp, lambda o, b: {"total": o["out"].mean()},
                          torch.optim.SGD(wrapped.parameters(), lr=0.1), lambda it: 1.0,
                          lambda start: iter([]), tmp_path, max_iters=1, iter_size=1,
                          precision="fp32", clip_grad_norm=None, log_interval=1, seed=0,
                          device=torch.device("cpu"))
        assert trainer.state_dict()["model"].keys() == wrapped.state_dict().keys()
    finally:
        torch.distributed.destroy_process_group()

