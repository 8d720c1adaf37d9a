"""Evaluation loop: inference (predictor -> optional dense CRF) -> confusion matrix -> scores.

Follows detectron2's reset/process/evaluate protocol in one plain function-like class.

The dense CRF runs on the CPU, one image per task, in ``crf_workers`` processes while the
model computes the next images; results are collected in the loader's order, so scores and
sample figures are identical to the serial path (``crf_workers=0``).

The logits and labels come from ``segtrain.eval.inference.Inference``, the one test-time
path that ``segtrain.predict`` and the Python API use too: the forward passes at
``eval.precision`` (fp32 unless asked otherwise, whatever precision the model trains at, so
the trainer's periodic evaluation, which picks best.pt and writes metrics.json, scores
exactly what ``segtrain.evaluate`` scores), at ``eval.output_stride`` (DeepLab v3 Sec. 4.2:
train at output stride 16, evaluate at 8; the training stride is restored afterwards).

The CRF and the sample figures get the image as read from disk (the batch's ``"rgb"``), never
an un-normalised copy of the network input.

The progress bar is drawn only on a terminal; elsewhere (SLURM output files, nohup, CI) a
log line every tenth of the images says how far the evaluation is.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.errors import ConfigError
from segtrain.eval.crf import crf_labels, default_workers, softmax_probs
from segtrain.eval.inference import Inference
from segtrain.eval.metrics import ConfusionMatrix
from segtrain.eval.per_image import PerImageCounts, image_miou

log = logging.getLogger("segtrain")


def crf_pool(workers: int, initializer: Callable[..., None] | None = None,
             initargs: tuple = ()) -> ProcessPoolExecutor:
    """Processes for the CRF, spawned: a fork after CUDA/NCCL initialisation (the trainer's
    periodic evaluation, torchrun) copies their threads and locks in an unusable state. Each
    worker imports segtrain.eval.crf once (about a second), against the CRF's ~1 s per image.
    A spawned worker inherits no module state: ``initializer(*initargs)`` hands it data."""
    return ProcessPoolExecutor(max_workers=workers, initializer=initializer,
                               initargs=initargs,
                               mp_context=multiprocessing.get_context("spawn"))


class Evaluator:
    """Scores a model on a loader of full-size images.

    Args:
        loader: batches of ``{"image", "mask", "meta"}`` (batch size 1 for varying sizes).
        num_classes, ignore_index, class_names: of the dataset.
        inference: predictor (whole / slide / multi-scale / flip), optional dense CRF,
            precision and output stride of the evaluation.
        num_samples: how many (image, gt, prediction) triples to keep for figures.
        show_progress: a progress bar on a terminal, log lines elsewhere.
        crf_workers: processes for the CRF; None: this rank's share of the node's cores;
            0: in this process.
        per_image: also count each image's per-class intersection and union
            (``segtrain.eval.per_image``), kept in ``per_image`` after ``run`` (every rank's
            images, gathered in image order).
        dump_worst: keep the ``dump_worst`` images with the lowest per-image mIoU (image as
            read, ground truth, prediction, id, score) in ``worst`` after ``run``, lowest
            first (every rank's, gathered); 0: none.

    The loader's batches carry ``"rgb"`` (the image as read) when there is a CRF or
    ``num_samples > 0``.
    """

    def __init__(self, loader: DataLoader, num_classes: int, ignore_index: int,
                 class_names: Sequence[str], inference: Inference, num_samples: int = 4,
                 show_progress: bool = False, crf_workers: int | None = None,
                 per_image: bool = False, dump_worst: int = 0) -> None:
        if crf_workers is not None and (int(crf_workers) != crf_workers or crf_workers < 0):
            raise ConfigError(f"eval.crf_workers must be null (every core), 0 (no extra "
                              f"process) or a positive integer, got {crf_workers!r}")
        self.loader, self.num_classes, self.ignore_index = loader, num_classes, ignore_index
        self.class_names, self.inference = list(class_names), inference
        self.num_samples = num_samples
        self.show_progress = show_progress
        self.crf_workers = default_workers() if crf_workers is None else int(crf_workers)
        self.samples: list[dict[str, Any]] = []
        self.per_image_counts = PerImageCounts(num_classes, ignore_index) if per_image else None
        self.per_image: dict[str, Any] | None = None
        self.dump_worst = int(dump_worst)
        self.worst: list[dict[str, Any]] = []

    def check_model(self, model: nn.Module) -> None:
        """Refuse ``eval.output_stride`` for a model that cannot change its stride."""
        self.inference.check(model)

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        pool = None
        with self.inference.applied_to(model):
            try:
                if self.inference.crf is not None and self.crf_workers > 0:
                    pool = crf_pool(self.crf_workers)
                return self._run(model, device, pool)
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)

    def _progress(self) -> tuple[tqdm, int]:
        """A bar over the loader on a terminal (tqdm's ``disable=None``); elsewhere, how many
        batches between log lines (0: none)."""
        bar = tqdm(self.loader, desc="eval", leave=False, dynamic_ncols=True,
                   disable=None if self.show_progress else True)
        quiet = self.show_progress and bar.disable  # asked for, but not on a terminal
        return bar, max(1, len(self.loader) // 10) if quiet else 0

    def _run(self, model: nn.Module, device: torch.device,
             pool: ProcessPoolExecutor | None) -> dict[str, Any]:
        cm = ConfusionMatrix(self.num_classes, self.ignore_index, device)
        self.samples = []
        if self.per_image_counts is not None:
            self.per_image_counts.reset()
        self.worst = []
        # (image, target, prediction or CRF futures) in loader order, waiting to be counted
        pending: collections.deque = collections.deque()
        max_pending = 2 * self.crf_workers  # bounds the probabilities held in memory
        batches, log_every = self._progress()
        start = time.perf_counter()
        for step, batch in enumerate(batches, 1):
            image = batch["image"].to(device, non_blocking=True)
            target = batch["mask"].to(device, non_blocking=True)
            rgb = self._rgb(batch)
            ids = [str(m.get("name", m.get("index"))) for m in batch["meta"]]
            logits = self.inference.logits(model, image)
            if self.inference.crf is None or pool is None:
                pending.append((rgb, target, self.inference.labels(logits, rgb), ids))
            else:
                pending.append((rgb, target, self._crf_submit(rgb, logits, pool), ids))
            # count what is done; with a pool, wait only when too much is queued
            while pending and (pool is None or len(pending) > max_pending
                               or all(f.done() for f in pending[0][2])):
                self._count(cm, *pending.popleft())
            if log_every and (step % log_every == 0 or step == len(self.loader)):
                log.info("eval: %d/%d batches, %.0f s", step, len(self.loader),
                         time.perf_counter() - start)
        while pending:
            self._count(cm, *pending.popleft())
        cm.all_reduce()
        if self.per_image_counts is not None:
            self.per_image = self._gathered(self.per_image_counts.evaluate())
        if self.dump_worst:
            self.worst = self._worst_of_all_ranks()
        scores = cm.compute()
        scores["confusion_matrix"] = cm.matrix.cpu().tolist()
        return scores

    @staticmethod
    def _gathered(counts: dict[str, Any]) -> dict[str, Any]:
        """Every rank's per-image counts, in image order (rank r scored images r, r+W, ...:
        ``eval_loader``)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return counts
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, counts)
        order = [(i, r) for r, part in enumerate(parts) for i in range(len(part["ids"]))]
        order.sort()  # i-th image of rank r is image i * W + r
        return {"ids": [parts[r]["ids"][i] for i, r in order],
                "intersection": np.stack([parts[r]["intersection"][i] for i, r in order]),
                "union": np.stack([parts[r]["union"][i] for i, r in order])}

    def _keep_worst(self, rgb: np.ndarray, target: torch.Tensor, pred: torch.Tensor,
                    ids: list[str]) -> None:
        inter, union = PerImageCounts(self.num_classes, self.ignore_index).counts(pred, target)
        scores = image_miou(inter.cpu().numpy(), union.cpu().numpy())
        for i, score in enumerate(scores):
            if score != score:  # an all-ignored image has no score
                continue
            self.worst.append({"id": ids[i], "miou": float(score), "image": rgb[i],
                               "mask": target[i].cpu().numpy(), "pred": pred[i].cpu().numpy()})
        self.worst.sort(key=lambda w: w["miou"])  # stable: ties keep the loader's order
        del self.worst[self.dump_worst:]

    def _worst_of_all_ranks(self) -> list[dict[str, Any]]:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.worst
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, self.worst)
        merged = sorted((w for part in parts for w in part), key=lambda w: w["miou"])
        return merged[:self.dump_worst]

    def _rgb(self, batch: dict[str, Any]) -> np.ndarray | None:
        """The batch's images as read (uint8 NxHxWx3), where the CRF or figures need them."""
        if self.inference.crf is None and len(self.samples) >= self.num_samples \
                and not self.dump_worst:
            return None
        if "rgb" not in batch:
            raise ValueError("the evaluation loader's items carry no 'rgb' (the image as read, "
                             "uint8 HxWx3), which the dense CRF and the sample figures need: "
                             "set keep_rgb on the dataset (segtrain.app.build_val_set does)")
        return batch["rgb"].numpy()

    def _crf_submit(self, rgb: np.ndarray, logits: torch.Tensor,
                    pool: ProcessPoolExecutor) -> list[Future]:
        """One CRF job per image in the pool, as ``Inference.labels`` runs it in-process:
        float32 probabilities and the uint8 image as read."""
        probs, crf = softmax_probs(logits), self.inference.crf
        return [pool.submit(crf_labels, crf, rgb[i], probs[i]) for i in range(len(probs))]

    def _count(self, cm: ConfusionMatrix, rgb: np.ndarray | None, target: torch.Tensor,
               pred: torch.Tensor | list[Future], ids: list[str]) -> None:
        if isinstance(pred, list):
            pred = torch.from_numpy(np.stack([f.result() for f in pred])).to(target.device)
        cm.update(pred, target)
        if self.per_image_counts is not None:
            self.per_image_counts.process(pred, target, ids)
        if self.dump_worst:
            self._keep_worst(rgb, target, pred, ids)
        if len(self.samples) < self.num_samples:
            self.samples.append({"image": rgb[0], "mask": target[0].cpu().numpy(),
                                 "pred": pred[0].cpu().numpy()})
