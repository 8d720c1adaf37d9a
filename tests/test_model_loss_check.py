"""The output keys every model declares and the model/loss check of ``app.py``: a loss that
needs outputs the model does not return stops at start-up with one line naming the config
options and the models that fit.
"""

from __future__ import annotations

import pytest

from segtrain.app import models_that_fit, train
from segtrain.errors import ConfigError
from segtrain.models.pspnet import PSPNet
from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, TINY
from tests.test_cpnet import small_cpnet
from tests.test_models_zoo import SMALL, K, tiny_batch
from tests.test_spnet import small_spnet

# one intra-op thread (conftest.one_thread) for every test of this file
pytestmark = pytest.mark.usefixtures("one_thread")


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
    res = run_module("segtrain", *TINY, "model=deeplabv3", "loss=affinity",
                     f"hydra.run.dir={tmp_path}")
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
