"""Evaluation loop: inference (predictor -> optional dense CRF) -> metrics -> scores.

The loop goes over the data once and feeds every metric (detectron2's reset/process/evaluate
protocol, ``segtrain.eval.metrics.Metric``): the confusion matrix gives the scores, the
sample figures keep a few predictions, and a caller adds its own metric objects.

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

from segtrain.eval.crf import crf_labels, default_workers
from segtrain.eval.inference import Inference
from segtrain.eval.metrics import ConfusionMatrix, EvalBatch, Metric, SampleFigures
from segtrain.eval.per_image import PerImageCounts, WorstImages

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
        crf_workers: processes for the CRF (``eval.crf_workers``, checked by the config
            schema); None: this rank's share of the node's cores; 0: in this process.
        metrics: further ``Metric`` objects fed every batch besides the confusion matrix and
            the sample figures; their scores join the confusion matrix's.
        per_image: also count each image's per-class intersection and union
            (``segtrain.eval.per_image.PerImageCounts``): ``per_image`` after ``run``.
        dump_worst: keep the ``dump_worst`` images of lowest per-image mIoU
            (``segtrain.eval.per_image.WorstImages``): ``worst`` after ``run``; 0: none.

    The loader's batches carry ``"rgb"`` (the image as read) when there is a CRF or a metric
    needs it (the sample figures while ``num_samples`` are not yet kept).
    """

    def __init__(self, loader: DataLoader, num_classes: int, ignore_index: int,
                 class_names: Sequence[str], inference: Inference, num_samples: int = 4,
                 show_progress: bool = False, crf_workers: int | None = None,
                 metrics: Sequence[Metric] = (), per_image: bool = False,
                 dump_worst: int = 0) -> None:
        self.loader, self.num_classes, self.ignore_index = loader, num_classes, ignore_index
        self.class_names, self.inference = list(class_names), inference
        self.show_progress = show_progress
        self.crf_workers = default_workers() if crf_workers is None else crf_workers
        self.figures = SampleFigures(num_samples)
        self.counts = PerImageCounts(num_classes, ignore_index) if per_image else None
        self.lowest = WorstImages(dump_worst, num_classes, ignore_index) if dump_worst else None
        self.metrics: list[Metric] = [ConfusionMatrix(num_classes, ignore_index),
                                      self.figures, *metrics,
                                      *(m for m in (self.counts, self.lowest) if m)]

    @property
    def per_image(self) -> dict[str, Any] | None:
        """The per-image counts of the last evaluation (``per_image``), else None."""
        return None if self.counts is None else self.counts.result

    @property
    def worst(self) -> list[dict[str, Any]]:
        """The lowest-scored images of the last evaluation (``dump_worst``), lowest first."""
        return [] if self.lowest is None else self.lowest.worst

    @property
    def samples(self) -> list[dict[str, Any]]:
        """The (image as read, ground truth, prediction) triples of the last evaluation."""
        return self.figures.samples

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
        for metric in self.metrics:
            metric.reset(device)
        # batches in loader order whose labels (or CRF futures) wait to be processed
        pending: collections.deque[tuple[EvalBatch, list[Future] | None]] = collections.deque()
        max_pending = 2 * self.crf_workers  # bounds the probabilities held in memory
        batches, log_every = self._progress()
        start = time.perf_counter()
        for step, batch in enumerate(batches, 1):
            image = batch["image"].to(device, non_blocking=True)
            item = EvalBatch(pred=None, target=batch["mask"].to(device, non_blocking=True),
                             meta=batch.get("meta"), rgb=self._rgb(batch))
            logits = self.inference.logits(model, image)
            if self.inference.crf is None or pool is None:
                item.pred = self.inference.labels(logits, item.rgb)
                pending.append((item, None))
            else:
                jobs = self.inference.crf_jobs(logits, item.rgb)
                pending.append((item, [pool.submit(crf_labels, *job) for job in jobs]))
            # process what is done; with a pool, wait only when too much is queued
            while pending and (pool is None or len(pending) > max_pending
                               or all(f.done() for f in pending[0][1])):
                self._process(*pending.popleft())
            if log_every and (step % log_every == 0 or step == len(self.loader)):
                log.info("eval: %d/%d batches, %.0f s", step, len(self.loader),
                         time.perf_counter() - start)
        while pending:
            self._process(*pending.popleft())
        scores: dict[str, Any] = {}
        for metric in self.metrics:
            result = metric.evaluate()
            if result.keys() & scores.keys():
                raise ValueError(f"{type(metric).__name__} returns scores another metric "
                                 f"returns: {sorted(result.keys() & scores.keys())}")
            scores.update(result)
        return scores

    def _rgb(self, batch: dict[str, Any]) -> np.ndarray | None:
        """The batch's images as read (uint8 NxHxWx3), where the CRF or a metric needs them."""
        if self.inference.crf is None and not any(m.needs_rgb() for m in self.metrics):
            return None
        if "rgb" not in batch:
            raise ValueError("the evaluation loader's items carry no 'rgb' (the image as read, "
                             "uint8 HxWx3), which the dense CRF and the sample figures need: "
                             "build the dataset with keep_rgb=True (app.build_val_set does)")
        return batch["rgb"].numpy()

    def _process(self, item: EvalBatch, crf_futures: list[Future] | None) -> None:
        if crf_futures is not None:
            labels = np.stack([f.result() for f in crf_futures])
            item.pred = torch.from_numpy(labels).to(item.target.device)
        for metric in self.metrics:
            metric.process(item)
