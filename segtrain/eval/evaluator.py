"""Evaluation loop: predictor -> optional dense CRF -> confusion matrix -> scores.

Follows detectron2's reset/process/evaluate protocol in one plain function-like class.

The dense CRF runs on the CPU, one image per task, in ``crf_workers`` processes while the
model computes the next images; results are collected in the loader's order, so scores and
sample figures are identical to the serial path (``crf_workers=0``).

The forward passes run at ``precision`` (``eval.precision``, fp32 unless asked otherwise),
whatever precision the model trains at: the trainer's periodic evaluation, which picks
best.pt and writes metrics.json, scores exactly what ``segtrain.evaluate`` scores.

The CRF and the sample figures get the image as read from disk (the batch's ``"rgb"``), never
an un-normalised copy of the network input.

``output_stride`` re-dilates a network that supports it (``CAN_SET_OUTPUT_STRIDE`` of the
model contract, ``segtrain.models.base``: DeepLab v3/v3+) for the evaluation and restores
the training stride afterwards (DeepLab v3 Sec. 4.2: train at output stride 16, evaluate
at 8).
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.engine.precision import autocast_dtype, resolve_precision
from segtrain.errors import ConfigError
from segtrain.eval.crf import DenseCRF, crf_labels, default_workers, softmax_probs
from segtrain.eval.inference import Predictor
from segtrain.eval.metrics import ConfusionMatrix
from segtrain.models.base import SegmentationModel, bare


def check_output_stride(model: nn.Module, output_stride: int | None) -> None:
    """``eval.output_stride`` needs a model that declares ``CAN_SET_OUTPUT_STRIDE``."""
    if output_stride is None:
        return
    net = bare(model)
    if not isinstance(net, SegmentationModel) or not net.CAN_SET_OUTPUT_STRIDE:
        raise ConfigError(
            f"eval.output_stride={output_stride}: {type(net).__name__} cannot change its "
            f"output stride (only models with CAN_SET_OUTPUT_STRIDE, DeepLab v3/v3+, can); "
            f"use eval.output_stride=null")


def crf_pool(workers: int) -> ProcessPoolExecutor:
    """Processes for the CRF, spawned: a fork after CUDA/NCCL initialisation (the trainer's
    periodic evaluation, torchrun) copies their threads and locks in an unusable state. Each
    worker imports segtrain.eval.crf once (about a second), against the CRF's ~1 s per image."""
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"))


class Evaluator:
    """Scores a model on a loader of full-size images.

    Args:
        loader: batches of ``{"image", "mask", "meta"}`` (batch size 1 for varying sizes).
        num_classes, ignore_index, class_names: of the dataset.
        predictor: how logits are produced (whole / slide / multi-scale / flip).
        crf: optional ``DenseCRF`` applied to the softmax before the argmax.
        num_samples: how many (image, gt, prediction) triples to keep for figures.
        crf_workers: processes for the CRF; None: this rank's share of the node's cores;
            0: in this process.
        output_stride: evaluate at this output stride (None: as trained).
        precision: ``eval.precision``: fp32 | bf16 | fp16 | auto, the autocast of the
            forward passes (fusion and CRF inputs are fp32 in every case).

    The loader's batches carry ``"rgb"`` (the image as read) when there is a CRF or
    ``num_samples > 0``.
    """

    def __init__(self, loader: DataLoader, num_classes: int, ignore_index: int,
                 class_names: Sequence[str], predictor: Predictor,
                 crf: DenseCRF | None = None, num_samples: int = 4,
                 show_progress: bool = False, crf_workers: int | None = None,
                 output_stride: int | None = None, precision: str = "fp32") -> None:
        if crf_workers is not None and (int(crf_workers) != crf_workers or crf_workers < 0):
            raise ConfigError(f"eval.crf_workers must be null (every core), 0 (no extra "
                              f"process) or a positive integer, got {crf_workers!r}")
        self.loader, self.num_classes, self.ignore_index = loader, num_classes, ignore_index
        self.class_names, self.predictor, self.crf = list(class_names), predictor, crf
        self.num_samples = num_samples
        resolve_precision(precision, torch.device("cpu"), key="eval.precision")  # checked now
        self.precision = precision
        self.show_progress = show_progress
        self.crf_workers = default_workers() if crf_workers is None else int(crf_workers)
        self.output_stride = output_stride
        self.samples: list[dict[str, Any]] = []

    def check_model(self, model: nn.Module) -> None:
        """Refuse ``eval.output_stride`` for a model that cannot change its stride."""
        check_output_stride(model, self.output_stride)

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        self.check_model(model)
        amp = autocast_dtype(resolve_precision(self.precision, device, key="eval.precision"))
        was_training = model.training
        trained_stride = None if self.output_stride is None else bare(model).output_stride
        pool = None
        model.eval()
        try:
            if self.output_stride is not None:
                bare(model).set_output_stride(int(self.output_stride))
            if self.crf is not None and self.crf_workers > 0:
                pool = crf_pool(self.crf_workers)
            scores = self._run(model, device, amp, pool)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            if self.output_stride is not None:
                bare(model).set_output_stride(trained_stride)
            model.train(was_training)
        return scores

    def _run(self, model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None,
             pool: ProcessPoolExecutor | None) -> dict[str, Any]:
        cm = ConfusionMatrix(self.num_classes, self.ignore_index, device)
        self.samples = []
        # (image, target, prediction or CRF futures) in loader order, waiting to be counted
        pending: collections.deque = collections.deque()
        max_pending = 2 * self.crf_workers  # bounds the probabilities held in memory
        batches = tqdm(self.loader, desc="eval", leave=False, disable=not self.show_progress)
        for batch in batches:
            image = batch["image"].to(device, non_blocking=True)
            target = batch["mask"].to(device, non_blocking=True)
            rgb = self._rgb(batch)
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = self.predictor(model, image)
            logits = logits.float()
            if self.crf is None:
                pending.append((rgb, target, logits.argmax(1)))
            else:
                pending.append((rgb, target, self._crf_submit(rgb, logits, pool)))
            # count what is done; with a pool, wait only when too much is queued
            while pending and (pool is None or len(pending) > max_pending
                               or all(f.done() for f in pending[0][2])):
                self._count(cm, *pending.popleft())
        while pending:
            self._count(cm, *pending.popleft())
        cm.all_reduce()
        scores = cm.compute()
        scores["confusion_matrix"] = cm.matrix.cpu().tolist()
        return scores

    def _rgb(self, batch: dict[str, Any]) -> np.ndarray | None:
        """The batch's images as read (uint8 NxHxWx3), where the CRF or figures need them."""
        if self.crf is None and len(self.samples) >= self.num_samples:
            return None
        if "rgb" not in batch:
            raise ValueError("the evaluation loader's items carry no 'rgb' (the image as read, "
                             "uint8 HxWx3), which the dense CRF and the sample figures need: "
                             "set keep_rgb on the dataset (segtrain.app.build_val_set does)")
        return batch["rgb"].numpy()

    def _crf_submit(self, rgb: np.ndarray, logits: torch.Tensor,
                    pool: ProcessPoolExecutor | None) -> list[Future]:
        """One CRF job per image: float32 probabilities and the uint8 image as read."""
        probs = softmax_probs(logits)
        jobs = []
        for i in range(rgb.shape[0]):
            if pool is None:
                done: Future = Future()
                done.set_result(crf_labels(self.crf, rgb[i], probs[i]))
                jobs.append(done)
            else:
                jobs.append(pool.submit(crf_labels, self.crf, rgb[i], probs[i]))
        return jobs

    def _count(self, cm: ConfusionMatrix, rgb: np.ndarray | None, target: torch.Tensor,
               pred: torch.Tensor | list[Future]) -> None:
        if isinstance(pred, list):
            pred = torch.from_numpy(np.stack([f.result() for f in pred])).to(target.device)
        cm.update(pred, target)
        if len(self.samples) < self.num_samples:
            self.samples.append({"image": rgb[0], "mask": target[0].cpu().numpy(),
                                 "pred": pred[0].cpu().numpy()})
