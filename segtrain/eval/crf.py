"""Fully connected CRF post-processing (Krahenbuhl & Koltun, NIPS 2011), as DeepLab v1/v2
apply it (v2 Sec. 3.3, Eq. 2-3): unary = -log softmax, a Gaussian smoothness kernel
(theta_gamma) and an appearance kernel over position and RGB (theta_alpha, theta_beta),
mean-field inference for a fixed number of iterations. Uses pydensecrf2.

pydensecrf2's API, read from its source (``densecrf.pyx``): ``addPairwiseGaussian(sxy,
compat)`` and ``addPairwiseBilateral(sxy, srgb, rgbim, compat)`` divide the pixel
coordinates by ``sxy`` and the colour values by ``srgb`` (so both are standard deviations,
theta_gamma / theta_alpha in pixels and theta_beta in 0..255 colour units), and a number as
``compat`` is a Potts compatibility of that weight (w2 / w1). The image must be an HxWx3
uint8, C-contiguous and writable buffer (a non-const memoryview) in the original colour scale:
the image as read from disk, which the evaluation set carries as ``"rgb"`` (nothing inverts
the normalisation, so raw-pixel and RGB-D runs give the CRF their real colours too); the
unary must be a C-contiguous float32 (K, H*W) array.

The parameter values live in the eval configs (conf/eval/msc_crf.yaml: the released DeepLab
v2 ResNet-101 values; conf/eval/crf_v1.yaml: DeepLab v1 LargeFOV). ``crf_labels`` is the
per-image job that ``Evaluator`` hands to ``eval.crf_workers`` processes.
"""

from __future__ import annotations

import numpy as np
import torch

from segtrain.errors import ConfigError


class DenseCRF:
    """Refines class probabilities of one image with a dense CRF.

    Args:
        iterations: mean-field iterations (DeepLab: 10).
        pos_w, pos_xy_std: weight and spatial std (w2, theta_gamma) of the smoothness kernel.
        bi_w, bi_xy_std, bi_rgb_std: weight and stds (w1, theta_alpha, theta_beta) of the
            appearance kernel.
    """

    def __init__(self, iterations: int, pos_w: float, pos_xy_std: float, bi_w: float,
                 bi_xy_std: float, bi_rgb_std: float) -> None:
        try:
            import pydensecrf.densecrf  # noqa: F401
        except ImportError as err:  # pragma: no cover - it is a declared dependency
            raise ImportError("dense CRF needs pydensecrf2: pip install pydensecrf2") from err
        values = dict(iterations=iterations, pos_w=pos_w, pos_xy_std=pos_xy_std, bi_w=bi_w,
                      bi_xy_std=bi_xy_std, bi_rgb_std=bi_rgb_std)
        for key, value in values.items():
            if not value > 0:
                raise ConfigError(f"eval.crf.{key} must be positive, got {value!r}")
        self.iterations = int(iterations)
        self.pos_w, self.pos_xy_std = pos_w, pos_xy_std
        self.bi_w, self.bi_xy_std, self.bi_rgb_std = bi_w, bi_xy_std, bi_rgb_std

    def __call__(self, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """``rgb`` uint8 HxWx3, ``probs`` float KxHxW (softmax) -> refined KxHxW probabilities."""
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax

        k, h, w = probs.shape
        crf = dcrf.DenseCRF2D(w, h, k)
        crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
        crf.addPairwiseGaussian(sxy=self.pos_xy_std, compat=self.pos_w)
        # pydensecrf takes a writable uint8 C buffer: an image decoded by PIL (np.asarray)
        # is read-only and would raise "buffer source array is read-only"
        crf.addPairwiseBilateral(sxy=self.bi_xy_std, srgb=self.bi_rgb_std,
                                 rgbim=np.require(rgb, np.uint8, ("C", "W")), compat=self.bi_w)
        q = crf.inference(self.iterations)
        return np.asarray(q, dtype=np.float32).reshape(k, h, w)


def crf_labels(crf: DenseCRF, rgb: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The CRF's label map (H x W int64) of one image: the unit of work of a CRF process.
    ``rgb``: the image as read (uint8 HxWx3); ``probs``: the fp32 softmax (KxHxW)."""
    return crf(rgb, probs).argmax(0)


def softmax_probs(logits: torch.Tensor) -> np.ndarray:
    """The CRF's input probabilities of a batch of logits (N,K,H,W): fp32 softmax on the
    host; ``segtrain.evaluate``, ``segtrain.predict`` and scripts/crf_search.py share it."""
    return logits.float().softmax(1).cpu().numpy()


def default_workers() -> int:
    """The CRF's processes: this rank's share of the cores
    (``segtrain.core.distributed.cores_per_rank``)."""
    from segtrain.core.distributed import cores_per_rank

    return cores_per_rank()
