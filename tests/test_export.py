"""``python -m segtrain.export``: ONNX (checked with onnxruntime) and TorchScript files of a
run's network agree with PyTorch at a fixed and at a free input size, and a model whose
graph fixes its size (CPNet's prior map) fails the dynamic check with a clear message."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from segtrain.app import build_model
from segtrain.errors import ConfigError
from segtrain.export import ExportError, export, main_export
from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, TINY

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export needs it; both come with the export extra


def _model(*overrides: str) -> torch.nn.Module:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    proc = run_module("segtrain", *TINY, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


@pytest.mark.parametrize("fmt,dynamic", [("onnx", False), ("onnx", True),
                                         ("torchscript", True)])
def test_export_command_writes_a_file_that_agrees_with_pytorch(run_dir, tmp_path, fmt,
                                                               dynamic):
    proc = run_module("segtrain.export", f"run={run_dir}", f"format={fmt}",
                      f"dynamic={str(dynamic).lower()}", f"out={tmp_path}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = f"model_{'dynamic' if dynamic else '32x32'}.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert (tmp_path / name).is_file()
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert "max abs logit difference from PyTorch" in proc.stdout
    assert report["max_abs_logit_diff"] <= 1e-3 * max(1.0, report["max_abs_logit"])
    # a dynamic file was also run at another batch and size than the one exported
    assert len(report["checked_inputs"]) == (2 if dynamic else 1)
    assert report["mean"] == [0.5, 0.5, 0.5] and report["num_classes"] == 6

    # the file is the trained network: its logits are those of the run's checkpoint
    if fmt == "onnx":
        import onnxruntime

        x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
        session = onnxruntime.InferenceSession(str(tmp_path / name))
        theirs = session.run(["logits"], {"image": x})[0]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=TINY)
        model = build_model(cfg).eval()
        state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            ours = model(torch.from_numpy(x))["out"].numpy()
        assert np.abs(theirs - ours).max() <= 1e-3 * max(1.0, np.abs(ours).max())


@pytest.mark.parametrize("model", ["deeplabv1", "deeplabv3_mobilenetv2"])
def test_models_export_to_onnx_at_a_free_size(tmp_path, model):
    net = _model(f"model={model}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export(net, "onnx", tmp_path / "m.onnx", (32, 32), dynamic=True)
    assert result["max_abs_logit_diff"] <= 1e-3 * max(1.0, result["max_abs_logit"])
    # torch's notice that this is its TorchScript-based exporter is known and not repeated
    assert not [w for w in caught if "legacy TorchScript-based" in str(w.message)]


def test_an_unknown_format_is_refused_before_the_run_is_opened(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"run={tmp_path / 'no_run'}",
                                                       "format=pdf"])
    with pytest.raises(ConfigError, match="format='pdf': expected one of onnx, torchscript"):
        main_export(cfg)


def test_a_size_bound_graph_fails_the_dynamic_check(tmp_path):
    """CPNet's context prior is an (HW/64) x (HW/64) map of the training crop: the graph
    fixes the input size, so a dynamic export is refused when checked at another size."""
    net = _model("model=cpnet", "model.backbone=resnet18", "model.prior_size=[4,4]",
                 "dataset.image_size=32")
    fixed = export(net, "torchscript", tmp_path / "cp.pt", (32, 32), dynamic=False)
    assert fixed["max_abs_logit_diff"] <= 1e-3 * max(1.0, fixed["max_abs_logit"])
    with pytest.raises((ExportError, RuntimeError)):
        export(net, "torchscript", tmp_path / "cp_dyn.pt", (32, 32), dynamic=True)


def test_unet_fixes_its_size_in_python_and_fails_the_dynamic_check(tmp_path):
    """The unpadded U-Net picks its depth of valid convolutions from the input size in
    Python (segtrain/models/unet.py), which a traced graph records as constants."""
    net = _model("model=unet", "model.base_channels=4")
    fixed = export(net, "onnx", tmp_path / "u.onnx", (32, 32), dynamic=False)
    assert fixed["max_abs_logit_diff"] <= 1e-3 * max(1.0, fixed["max_abs_logit"])
    with pytest.raises(ExportError, match="logits of shape"):
        export(net, "onnx", tmp_path / "u_dyn.onnx", (32, 32), dynamic=True)
