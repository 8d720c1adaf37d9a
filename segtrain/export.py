"""Export a trained run's network for deployment: ONNX or TorchScript, checked against PyTorch.

    python -m segtrain.export run=outputs/<run>                              # ONNX, fixed size
    python -m segtrain.export run=outputs/<run> format=torchscript
    python -m segtrain.export run=outputs/<run> dynamic=true                 # any input size
    python -m segtrain.export run=outputs/<run> height=512 width=1024

The exported graph is whole-image inference of the network alone: input ``image``
(N x 3 x H x W, normalised with the run's mean/std), output ``logits`` (N x C x H x W, the
model's ``"out"``). Normalisation, multi-scale fusion, flipping, sliding windows and the
dense CRF stay in Python (``segtrain/eval/``). The size is fixed (``height`` x ``width``,
default the dataset's crop or image size) unless ``dynamic=true`` (batch, height and width
free). After writing, the file is loaded back (onnxruntime for ONNX, ``torch.jit.load`` for
TorchScript) and run on a random image; the maximum absolute difference of its logits from
PyTorch's is printed and stored beside the file (``<file>.json``); above ``tolerance`` times
the largest logit magnitude (at least 1) the command fails. ONNX needs the ``export`` extra
(``pip install -e .[export]``, part of ``make install``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from segtrain import runs
from segtrain.cli import user_errors
from segtrain.core.json_files import write_json
from segtrain.errors import ConfigError, UserError

log = logging.getLogger("segtrain")

FORMATS = ("onnx", "torchscript")


class ExportError(UserError):
    """The model cannot be exported, or the exported file disagrees with PyTorch."""


class LogitsOnly(nn.Module):
    """The network as a deployment graph: image in, the ``"out"`` logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]


def input_size(run_cfg: DictConfig, height: int | None, width: int | None) -> tuple[int, int]:
    """``height`` x ``width`` if given, else the dataset's ``crop_size`` or ``image_size``."""
    if height is not None and width is not None:
        return int(height), int(width)
    dataset = run_cfg.dataset
    if dataset.get("crop_size") is not None:
        return int(dataset.crop_size[0]), int(dataset.crop_size[1])
    if dataset.get("image_size") is not None:
        return int(dataset.image_size), int(dataset.image_size)
    raise ConfigError(f"the run's dataset ({dataset.get('name')}) has no crop_size or "
                      f"image_size: give the export size as height=<H> width=<W>")


#: what torch.onnx.export (torch 2.13, torch/onnx/__init__.py) warns with ``dynamo=False``
LEGACY_EXPORTER_NOTICE = "You are using the legacy TorchScript-based ONNX export"


def export_onnx(net: nn.Module, image: torch.Tensor, path: Path, dynamic: bool,
                opset: int) -> None:
    """The TorchScript-based exporter (``dynamo=False``), chosen knowingly over torch's
    default torch.export-based one: on the default DeepLab (ResNet-18) at 32x32 on a loaded
    2-core CPU the latter took 18-20 s per file against 4.5-7.6 s, printed a dozen progress
    and plugin lines, and converts down from its own opset (18+) to ``opset``; a graph that
    fixes its size in Python is caught by ``export``'s check at a second size either way.
    Its deprecation notice (a DeprecationWarning that ``python -m segtrain.export`` would
    show) is silenced alone, by its text."""
    axes = {"image": {0: "batch", 2: "height", 3: "width"},
            "logits": {0: "batch", 2: "height", 3: "width"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LEGACY_EXPORTER_NOTICE,
                                category=DeprecationWarning)
        torch.onnx.export(net, (image,), str(path), input_names=["image"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=opset,
                          dynamo=False)


def run_onnx(path: Path, image: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"image": image.numpy()})[0])


def export_torchscript(net: nn.Module, image: torch.Tensor, path: Path) -> None:
    traced = torch.jit.trace(net, (image,), check_trace=False)
    torch.jit.save(traced, str(path))


def run_torchscript(path: Path, image: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(str(path), map_location="cpu")(image)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")


def export(model: nn.Module, fmt: str, path: Path, size: tuple[int, int], dynamic: bool,
           opset: int = 17, seed: int = 0) -> dict[str, Any]:
    """Write ``model`` (eval mode, CPU) to ``path`` and check it on random images.

    Returns the sizes checked and the maximum absolute logit difference from PyTorch; a
    dynamic export is also checked at a second, different size.
    """
    check_format(fmt)
    net = LogitsOnly(model).eval()
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, *size, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "onnx":
            export_onnx(net, image, path, dynamic, opset)
        else:
            export_torchscript(net, image, path)
        checks = [(1, 3, *size)]
        if dynamic:  # another batch and size than the one traced
            checks.append((2, 3, size[0] + 16, size[1] + 32))
        diffs, scale = [], 0.0
        for shape in checks:
            x = torch.randn(*shape, generator=generator)
            ours = net(x)
            theirs = run_onnx(path, x) if fmt == "onnx" else run_torchscript(path, x)
            if theirs.shape != ours.shape:
                raise ExportError(f"{path}: the exported model gives logits of shape "
                                  f"{tuple(theirs.shape)} for input {shape}, PyTorch "
                                  f"{tuple(ours.shape)}")
            diffs.append(float((theirs - ours).abs().max()))
            scale = max(scale, float(ours.abs().max()))
    return {"format": fmt, "file": str(path), "dynamic": dynamic, "checked_inputs": checks,
            "max_abs_logit_diff": max(diffs), "max_abs_logit": scale}


def main_export(cfg: DictConfig) -> dict[str, Any]:
    check_format(str(cfg.format))  # before the run is opened and its checkpoint loaded
    run = runs.open_run(cfg.run, str(cfg.checkpoint), folder_only=True)
    run_dir, run_cfg, source = run.folder, run.config, run.checkpoint
    model = runs.build_model(run, torch.device("cpu"))
    size = input_size(run_cfg, cfg.height, cfg.width)
    suffix = ".onnx" if cfg.format == "onnx" else ".pt"
    path = Path(str(cfg.out)).expanduser() / f"model_{size[0]}x{size[1]}{suffix}"
    if cfg.dynamic:
        path = path.with_name(f"model_dynamic{suffix}")
    result = export(model, str(cfg.format), path, size, bool(cfg.dynamic), int(cfg.opset),
                    int(cfg.seed))
    result.update(run=str(run_dir), checkpoint=str(source),
                  num_classes=int(run_cfg.dataset.num_classes),
                  mean=list(run_cfg.dataset.mean), std=list(run_cfg.dataset.std))
    write_json(result, path.with_name(path.name + ".json"))
    diff, scale = result["max_abs_logit_diff"], result["max_abs_logit"]
    print(f"{path}: max abs logit difference from PyTorch {diff:.3g} (logits up to "
          f"{scale:.3g}) on random input(s) {result['checked_inputs']}", flush=True)
    # float32 kernels differ in summation order: the bound scales with the logits' size
    if not np.isfinite(diff) or diff > float(cfg.tolerance) * max(1.0, scale):
        raise ExportError(f"{path}: the exported model differs from PyTorch by {diff:.3g}, "
                          f"more than tolerance={cfg.tolerance} x max(1, {scale:.3g})")
    return result


@hydra.main(config_path="conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        main_export(cfg)


if __name__ == "__main__":
    main()
