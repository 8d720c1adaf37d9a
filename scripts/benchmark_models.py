"""Parameters, GFLOPs and CPU latency of the model configs, as a Markdown table.

    python scripts/benchmark_models.py                       # every model below
    python scripts/benchmark_models.py --models fcn8s unet   # a subset
    python scripts/benchmark_models.py --threads 1 --repeats 3
    python scripts/benchmark_models.py --models dsrl dsrl@train hanet

Each model is built from its ``conf/model/<name>.yaml`` (the papers' settings) with
``num_classes`` (21 by default) and ``pretrained: null``. A model with a ``prior_size``
(CPNet: its prior map is N x N over the feature grid) gets the grid of the measured input,
input / output stride, as the paper sizes it to the crop; its parameters are those of the
512x512 build (N = 64 x 64, the official config).

- GFLOPs: multiply-accumulates of every Conv2d, ConvTranspose2d and Linear counted with
  forward hooks on one 3x512x512 image, plus the batched matrix products (``torch.bmm``,
  CPNet's prior map times the features, counted with ``torch.utils.flop_counter``),
  reported as GFLOPs = 2 x MACs / 1e9 (BatchNorm, activations, pooling, interpolation and
  additions are not counted). The pass runs on
  the meta device, so it costs no compute.
- ``<config>@train`` measures the training-mode forward (``model.train()``), e.g. DSRL's
  SISR decoder and feature transform beside the segmentation path, plus, for DSRL, the
  two similarity matrices of the FA loss (Eq. 1: N^2 x C multiply-adds each, N pooled
  pixels, pooling from ``conf/loss/dsrl.yaml``). The forward runs on a batch of 2
  (BatchNorm needs two values per channel in training mode) and is divided by 2.
- Latency: batch 1, 3x256x256, ``model.eval()``, ``torch.no_grad()``, on the CPU; one warm-up
  pass, then the median and the minimum of ``--repeats`` timed passes. The load average is
  printed so that a busy machine shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segtrain.app import build_model

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
MODELS = ["deeplabv1", "deeplabv2", "deeplabv2_resnet18", "fcn32s", "fcn16s", "fcn8s", "unet",
          "segnet", "segnet_basic", "pspnet", "deeplabv3", "deeplabv3@os8",
          "deeplabv3_mobilenetv2", "deeplabv3plus", "dsrl", "dsrl@train", "hanet", "spnet",
          "cpnet"]


def fa_pool() -> int:
    """Pooling of the DSRL feature-affinity maps, as the loss config sets it."""
    return int(OmegaConf.load(CONF_MODEL.parent / "loss" / "dsrl.yaml").fa_pool)


def build(name: str, num_classes: int, size: int) -> nn.Module:
    """``name`` is a config in conf/model; ``<config>@os8`` re-dilates it to output stride 8,
    ``<config>@train`` keeps it in training mode (see the module docstring). ``size``: the
    input side the model is built for (sets a ``prior_size`` grid)."""
    config, _, variant = name.partition("@")
    stride = variant[2:] if variant.startswith("os") else ""
    # compose the real config tree, so model files with a defaults list resolve too
    with initialize_config_dir(config_dir=str(CONF_MODEL.parent), version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=[f"model={config}", f"dataset.num_classes={num_classes}"])
    if "prior_size" in cfg.model:
        grid = -(-size // cfg.model.output_stride)
        cfg.model.prior_size = [grid, grid]
    model = build_model(cfg)
    if stride:
        model.set_output_stride(int(stride))
    return model


def _forward(model: nn.Module, x: torch.Tensor, train: bool) -> None:
    """Run the eval or the training forward; in training, also DSRL's two FA similarity
    matrices (batched matrix products, counted by ``count_macs``)."""
    if not train:
        model.eval()(x)
        return
    outputs = model.train()(x)
    if "fa_seg" in outputs:
        from segtrain.losses.dsrl import similarity_matrix

        for key in ("fa_seg", "fa_sr"):
            similarity_matrix(outputs[key], fa_pool())


def count_macs(model: nn.Module, size: int, train: bool = False) -> int:
    """Multiply-accumulates of conv, transposed conv and linear layers and of batched
    matrix products for one image."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += inputs[0].numel() * (module.out_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    batch = 2 if train else 1
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model.to("meta")
            _forward(model, torch.empty(batch, in_channels, size, size, device="meta"), train)
    finally:
        for h in handles:
            h.remove()
    bmm = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) == "aten.bmm")
    return (total + bmm // 2) // batch


def latency(model: nn.Module, size: int, repeats: int,
            train: bool = False) -> tuple[float, float]:
    """Median and minimum seconds of one forward pass (batch 1, eval, no grad; in training
    mode batch 2, halved, the FA similarity matrices included)."""
    in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    batch = 2 if train else 1
    x = torch.randn(batch, in_channels, size, size)
    times = []
    with torch.no_grad():
        _forward(model, x, train)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            _forward(model, x, train)
            times.append((time.perf_counter() - start) / batch)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--flops-size", type=int, default=512)
    parser.add_argument("--time-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.2f}, {args.num_classes} classes\n")
    print(f"| model | parameters | GFLOPs @{args.flops_size} | CPU ms @{args.time_size} "
          f"(median / min of {args.repeats}) |")
    print("|---|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        train = name.partition("@")[2] == "train"
        model = build(name, args.num_classes, args.time_size)
        median, fastest = latency(model, args.time_size, args.repeats, train)
        model = build(name, args.num_classes, args.flops_size)
        params = sum(p.numel() for p in model.parameters())
        gflops = 2 * count_macs(model, args.flops_size, train) / 1e9
        print(f"| {name} | {params:,} | {gflops:.1f} | {median * 1e3:.0f} / {fastest * 1e3:.0f} |",
              flush=True)
        del model
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
