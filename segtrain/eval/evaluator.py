"""Evaluation loop: predictor -> optional dense CRF -> confusion matrix -> scores.

Follows detectron2's reset/process/evaluate protocol in one plain function-like class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segtrain.eval.crf import DenseCRF, denormalise
from segtrain.eval.inference import Predictor
from segtrain.eval.metrics import ConfusionMatrix


class Evaluator:
    """Scores a model on a loader of full-size images.

    Args:
        loader: batches of ``{"image", "mask", "meta"}`` (batch size 1 for varying sizes).
        num_classes, ignore_index, class_names: of the dataset.
        predictor: how logits are produced (whole / slide / multi-scale / flip).
        crf: optional ``DenseCRF`` applied to the softmax before the argmax.
        mean, std: the dataset normalisation (to recover RGB for the CRF).
        num_samples: how many (image, gt, prediction) triples to keep for figures.
    """

    def __init__(self, loader: DataLoader, num_classes: int, ignore_index: int,
                 class_names: Sequence[str], predictor: Predictor,
                 crf: DenseCRF | None = None, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), num_samples: int = 4,
                 show_progress: bool = False) -> None:
        self.loader, self.num_classes, self.ignore_index = loader, num_classes, ignore_index
        self.class_names, self.predictor, self.crf = list(class_names), predictor, crf
        self.mean, self.std, self.num_samples = list(mean), list(std), num_samples
        self.show_progress = show_progress
        self.samples: list[dict[str, Any]] = []

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device,
            autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        cm = ConfusionMatrix(self.num_classes, self.ignore_index, device)
        self.samples = []
        batches = tqdm(self.loader, desc="eval", leave=False, disable=not self.show_progress)
        for batch in batches:
            image = batch["image"].to(device, non_blocking=True)
            target = batch["mask"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = self.predictor(model, image)
            if self.crf is not None:
                pred = self._crf_predict(image, logits)
            else:
                pred = logits.argmax(1)
            cm.update(pred, target)
            if len(self.samples) < self.num_samples:
                self.samples.append({"image": denormalise(image[0], self.mean, self.std),
                                     "mask": target[0].cpu().numpy(),
                                     "pred": pred[0].cpu().numpy()})
        cm.all_reduce()
        model.train(was_training)
        scores = cm.compute()
        scores["confusion_matrix"] = cm.matrix.cpu().tolist()
        return scores

    def _crf_predict(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(1).cpu().numpy()
        preds = []
        for i in range(image.shape[0]):
            rgb = denormalise(image[i], self.mean, self.std)
            preds.append(self.crf(rgb, probs[i]).argmax(0))
        return torch.from_numpy(np.stack(preds)).to(image.device)
