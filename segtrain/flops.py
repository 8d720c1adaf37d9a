"""What a training step costs: FLOPs per image, the input an experiment trains on, and the
dense peak of the GPUs segtrain reports on. Used by ``scripts/bench.py`` (model FLOP
utilisation) and ``segtrain.reproduce`` (the cost plan of a paper table).
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from segtrain import app

# Dense peak FLOP/s per device name, the first pattern the name contains wins (so "H100 PCIe"
# before "H100"). Source: NVIDIA's data sheets (H100 Tensor Core GPU datasheet, H200 product
# brief, A100 datasheet), whose tensor-core figures are quoted with 2:4 sparsity; the dense
# peak is half of them (H100/H200 SXM: bf16 1979 -> 989 TFLOP/s, TF32 989 -> 494). "fp32"
# is TF32 tensor-core math, PyTorch's default for convolutions
# (torch.backends.cudnn.allow_tf32 = True; the report states the flag).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"fp32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"fp32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H200 NVL", {"fp32": 417.5, "bf16": 835.5, "fp16": 835.5}),
    ("H100", {"fp32": 494.5, "bf16": 989.5, "fp16": 989.5}),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", {"fp32": 494.5, "bf16": 989.5, "fp16": 989.5}),  # SXM: "NVIDIA H200"
    ("A100", {"fp32": 156.0, "bf16": 312.0, "fp16": 312.0}),
)
# The cost plan's model FLOP utilisation (MFU: FLOPs counted as above / time / dense peak)
# where no GPU run of scripts/bench.py measured segtrain's own (docs/gpu.md): an
# assumption, taken from the best-documented figure for a CNN trained in PyTorch. Segmentation
# training (larger maps, interpolation, BatchNorm, small batches) and H100s (3.2x an A100's
# dense peak for 1.7x its memory bandwidth) are unlikely to do better: the plan's GPU-hours
# are a lower bound until docs/gpu.md holds segtrain's measured MFU.
ASSUMED_MFU = 0.2
ASSUMED_MFU_SOURCE = (
    "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README: 2,470 img/s mixed precision "
    "on one A100 80GB x 24.3 GFLOP per training image (FlopCounterMode, 224x224) / 312 "
    "TFLOP/s dense = 19%")
# experiments that train on whole images have no crop in their pipeline: the input their
# paper trains on instead (FCN Sec. 4: whole PASCAL images, 500x375 the usual size, see
# conf/experiment/fcn32s_voc.yaml; SegNet: whole 360x480 CamVid frames; U-Net Fig. 1: a
# 572x572 input tile)
WHOLE_IMAGE_INPUT = {"fcn32s_voc": (375, 500), "fcn16s_voc": (375, 500),
                     "fcn8s_voc": (375, 500), "segnet_basic_camvid": (360, 480),
                     "segnet_camvid": (360, 480),
                     "unet": (572, 572)}


def peak_tflops(device_name: str) -> tuple[str, dict[str, float]] | None:
    """(matched pattern, dense peak TFLOP/s per precision) of a CUDA device name, or None."""
    return next(((key, peak) for key, peak in PEAK_TFLOPS if key in device_name), None)


def precision_peak_key(precision: str) -> str:
    """The ``PEAK_TFLOPS`` entry of a ``trainer.precision``: ``auto`` trains in bf16 on a
    CUDA device that supports it (segtrain/core/precision.py), fp32 is TF32 math."""
    return "bf16" if precision == "auto" else precision


def train_input_size(cfg: DictConfig, experiment: str | None) -> tuple[int, int]:
    """(height, width) ``cfg`` trains on: the crop of its training pipeline (the
    ``crop_size`` knob of ``train_augmentation``, or a RandomCrop in a custom list), else the
    whole-image input of its experiment (``WHOLE_IMAGE_INPUT``), else the dataset's own
    ``image_size`` (the embedded dataset)."""
    for step in cfg.dataset.get("train_transforms") or []:
        target = str(step.get("_target_", ""))
        if target.endswith("train_augmentation") and step.get("crop_size") is not None:
            return int(step.crop_size[0]), int(step.crop_size[1])
        if target.endswith("RandomCrop"):
            return int(step.height), int(step.width)
    if experiment in WHOLE_IMAGE_INPUT:
        return WHOLE_IMAGE_INPUT[experiment]
    if cfg.dataset.get("image_size") is not None:
        side = int(cfg.dataset.image_size)
        return side, side
    raise ValueError(f"experiment={experiment} has no RandomCrop in dataset.train_transforms "
                     f"and no entry in WHOLE_IMAGE_INPUT (segtrain/flops.py)")


def train_step_flops(cfg: DictConfig, size: tuple[int, int]) -> float:
    """FLOPs of one training step per image: forward, loss and backward, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no compute): every
    convolution and matrix product and their backward kernels (gradients of inputs and
    weights); normalisation, activations, pooling and interpolation are not counted. The
    first convolution computes no input gradient, so this is slightly below 3 x forward."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(cfg.seed)
    model = app.build_model(cfg).to("meta").train()
    loss_fn = instantiate(cfg.loss, class_weights=None).to("meta")
    in_channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    batch = 2  # BatchNorm in training mode needs two values per channel (1x1 pooled maps)
    image = torch.empty(batch, in_channels, *size, device="meta")
    mask = torch.zeros(batch, *size, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(image), {"image": image, "mask": mask})["total"].backward()
    return counter.get_total_flops() / batch
