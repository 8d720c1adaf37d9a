"""Test-time prediction: whole image, sliding window, multi-scale fusion and flipping.

- ``whole``: one forward on the full image.
- ``slide``: overlapping crops of ``crop_size`` every ``stride`` pixels, logits averaged
  where crops overlap (mmsegmentation's ``slide`` test mode; PSPNet Sec. 4). A model that
  takes source rows (``TAKES_ROWS``, HANet) gets each window's rows in the (scaled) image,
  1.0 for padding, as the training set's ``"rows"``; whole-image passes give none (the
  input's own rows).
- multi-scale: the image is resized by each of ``scales``, predicted, and the logits are
  brought back to the original size and fused by ``max`` (DeepLab v2 Sec. 4.1, "MSC ...
  we take the maximum response across scales") or ``mean``.
- ``flip``: the horizontally flipped prediction is flipped back and averaged in.

Every network output is cast to fp32 before it is summed, averaged, resized or max-fused,
so a forward pass under bf16/fp16 autocast (``eval.precision``) rounds only the network's
own computation, never the fusion.

``Inference`` is segtrain's one test-time path, around a ``Predictor``: the model in eval
mode at ``eval.output_stride`` (restored afterwards), the forward passes under
``eval.precision``, fp32 logits brought to the size of the image as read, then the argmax or
the dense CRF on that image. The trainer's periodic evaluation and ``segtrain.evaluate``
(through ``Evaluator``), ``segtrain.predict``, ``scripts/crf_search.py`` and the Python API
(``segtrain.load_run(run).predict(image)``) all go through it, so they give the same labels
for the same checkpoint and eval options.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segtrain.core.precision import autocast_dtype, resolve_precision
from segtrain.errors import ConfigError
from segtrain.eval.crf import DenseCRF, crf_labels, softmax_probs
from segtrain.models.base import SegmentationModel, bare

#: ``eval.predictor.mode`` and ``eval.predictor.fusion`` (the config schema checks them)
PREDICTOR_MODES = ("whole", "slide")
FUSIONS = ("max", "mean")


class Predictor:
    """Turns a model into a function ``image (N,C,H,W) -> logits (N,K,H,W)``.

    Args:
        mode: ``whole`` or ``slide``.
        scales: image scales; ``[1.0]`` for single scale.
        fusion: ``max`` or ``mean`` over scales.
        flip: also predict the mirrored image.
        crop_size, stride: window and step (pixels) for ``slide``.
    """

    def __init__(self, mode: str = "whole", scales: Sequence[float] = (1.0,),
                 fusion: str = "max", flip: bool = False,
                 crop_size: Sequence[int] | int | None = None,
                 stride: Sequence[int] | int | None = None) -> None:
        assert mode in PREDICTOR_MODES and fusion in FUSIONS, (mode, fusion)
        if mode == "slide" and (crop_size is None or stride is None):
            raise ValueError("eval.predictor.mode=slide needs eval.predictor.crop_size and "
                             "eval.predictor.stride")
        self.mode, self.scales, self.fusion, self.flip = mode, list(scales), fusion, flip
        pair = lambda v: None if v is None else (  # noqa: E731
            (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])))
        self.crop_size, self.stride = pair(crop_size), pair(stride)

    def _forward(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        if self.mode == "whole":
            return model(image)["out"].float()
        return self._slide(model, image)

    def _slide(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        n, _, h, w = image.shape
        # a window larger than the image shrinks to it (as mmsegmentation's slide_inference
        # clips its windows): padding a small image to the window would score mostly padding
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        sh, sw = self.stride
        H, W = h, w
        rows = list(range(0, max(H - ch, 0) + 1, sh))
        cols = list(range(0, max(W - cw, 0) + 1, sw))
        if rows[-1] + ch < H:
            rows.append(H - ch)
        if cols[-1] + cw < W:
            cols.append(W - cw)
        logits = None
        count = torch.zeros(1, 1, H, W, device=image.device)
        takes_rows = getattr(bare(model), "TAKES_ROWS", False)
        source = image_rows(n, h, H, W, image.device) if takes_rows else None
        for y in rows:
            for x in cols:
                window = image[:, :, y:y + ch, x:x + cw]
                if source is None:
                    out = model(window)["out"].float()
                else:
                    out = model(window, rows=source[:, y:y + ch, x:x + cw])["out"].float()
                if logits is None:
                    logits = torch.zeros(n, out.shape[1], H, W, device=image.device,
                                         dtype=torch.float32)
                logits[:, :, y:y + ch, x:x + cw] += out
                count[:, :, y:y + ch, x:x + cw] += 1
        return (logits / count)[:, :, :h, :w]

    def _single_scale(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        logits = self._forward(model, image)
        if self.flip:
            logits = 0.5 * (logits + self._forward(model, image.flip(-1)).flip(-1))
        return logits

    @torch.no_grad()
    def __call__(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        fused = None
        for s in self.scales:
            x = image if s == 1.0 else F.interpolate(
                image, scale_factor=s, mode="bilinear", align_corners=False)
            logits = self._single_scale(model, x)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            if fused is None:
                fused = logits
            elif self.fusion == "max":
                fused = torch.maximum(fused, logits)
            else:
                fused = fused + logits
        if self.fusion == "mean":
            fused = fused / len(self.scales)
        return fused


def image_rows(n: int, height: int, padded_height: int, width: int,
               device: torch.device) -> torch.Tensor:
    """N x padded_height x width source rows of an image of ``height`` rows padded at the
    bottom: row / height, 1.0 for padding (``segtrain.data.source_rows``)."""
    rows = (torch.arange(padded_height, device=device, dtype=torch.float32) / height).clamp(max=1)
    return rows[None, :, None].expand(n, padded_height, width)


def check_output_stride(model: nn.Module, output_stride: int | None) -> None:
    """``eval.output_stride`` needs a model that declares ``CAN_SET_OUTPUT_STRIDE`` (the model
    contract, ``segtrain.models.base``)."""
    if output_stride is None:
        return
    net = bare(model)
    if not isinstance(net, SegmentationModel) or not net.CAN_SET_OUTPUT_STRIDE:
        raise ConfigError(
            f"eval.output_stride={output_stride}: {type(net).__name__} cannot change its "
            f"output stride (only models with CAN_SET_OUTPUT_STRIDE, DeepLab v3/v3+, can); "
            f"use eval.output_stride=null")


class Inference:
    """The test-time path of one eval config: ``eval.predictor``, ``eval.crf``,
    ``eval.precision`` and ``eval.output_stride``.

    Use: ``with inference.applied_to(model): labels = inference(model, image, rgb)``.

    Args:
        predictor: whole / slide, scales and fusion, flip.
        crf: optional dense CRF on the softmax, with the image as read.
        precision: fp32 | bf16 | fp16 | auto, the autocast of the forward passes.
        output_stride: evaluate at this output stride (None: as trained).
    """

    def __init__(self, predictor: Predictor, crf: DenseCRF | None = None,
                 precision: str = "fp32", output_stride: int | None = None) -> None:
        self.predictor, self.crf = predictor, crf
        self.precision, self.output_stride = precision, output_stride

    def check(self, model: nn.Module) -> None:
        """Refuse ``eval.output_stride`` for a model that cannot change its stride."""
        check_output_stride(model, self.output_stride)

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` in eval mode at ``output_stride``; its mode and stride restored after."""
        self.check(model)
        net, was_training = bare(model), model.training
        trained_stride = net.output_stride if self.output_stride is not None else None
        model.eval()
        try:
            if self.output_stride is not None:
                net.set_output_stride(int(self.output_stride))
            yield model
        finally:
            if self.output_stride is not None:
                net.set_output_stride(trained_stride)
            model.train(was_training)

    @torch.no_grad()
    def logits(self, model: nn.Module, image: torch.Tensor,
               size: Sequence[int] | None = None) -> torch.Tensor:
        """fp32 logits (N,K,H,W) of a normalised batch, resized to ``size`` if given."""
        dtype = autocast_dtype(resolve_precision(self.precision, image.device))
        with torch.autocast(image.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.predictor(model, image)
        logits = logits.float()
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            # a validation pipeline that resizes: back to the image as read
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear",
                                   align_corners=False)
        return logits

    def crf_jobs(self, logits: torch.Tensor,
                 rgb: np.ndarray | None) -> list[tuple[DenseCRF, np.ndarray, np.ndarray]]:
        """The dense CRF's work on a batch, one ``(crf, image as read, fp32 softmax)`` job per
        image: ``crf_labels(*job)`` is its label map, ``crf(*job[1:])`` its marginals. The
        labels and probabilities here and the evaluator's CRF processes all run these jobs."""
        if rgb is None or tuple(rgb.shape[:3]) != (logits.shape[0], *logits.shape[-2:]):
            raise ValueError(f"the dense CRF needs the images as read, uint8 N x H x W x 3 "
                             f"matching the logits {tuple(logits.shape)}, got "
                             f"{None if rgb is None else tuple(rgb.shape)}")
        probs = softmax_probs(logits)
        return [(self.crf, rgb[i], probs[i]) for i in range(len(probs))]

    def labels(self, logits: torch.Tensor, rgb: np.ndarray | None = None) -> torch.Tensor:
        """Labels (N,H,W) int64 on the logits' device: the argmax, or the CRF's on ``rgb``
        (the images as read, uint8 NxHxWx3) when there is a CRF."""
        if self.crf is None:
            return logits.argmax(1)
        labels = [crf_labels(*job) for job in self.crf_jobs(logits, rgb)]
        return torch.from_numpy(np.stack(labels)).to(logits.device)

    def probabilities(self, logits: torch.Tensor,
                      rgb: np.ndarray | None = None) -> torch.Tensor:
        """Class probabilities (N,K,H,W) fp32 on the logits' device: the softmax, or the
        CRF's marginals when there is a CRF (their argmax is ``labels``)."""
        if self.crf is None:
            return logits.softmax(1)
        refined = [crf(image, probs) for crf, image, probs in self.crf_jobs(logits, rgb)]
        return torch.from_numpy(np.stack(refined)).to(logits.device)

    def __call__(self, model: nn.Module, image: torch.Tensor, rgb: np.ndarray | None = None,
                 return_probs: bool = False) -> torch.Tensor:
        """Labels (N,H,W) or probabilities (N,K,H,W) of a normalised batch ``image``, at the
        size of ``rgb`` (the images as read) when given; call inside ``applied_to(model)``."""
        logits = self.logits(model, image, None if rgb is None else rgb.shape[1:3])
        return self.probabilities(logits, rgb) if return_probs else self.labels(logits, rgb)
