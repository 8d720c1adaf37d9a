"""Fully connected CRF post-processing (Krahenbuhl & Koltun, NIPS 2011), as DeepLab v1/v2
apply it (v2 Sec. 3.3, Eq. 2-3): unary = -log softmax, a Gaussian smoothness kernel
(theta_gamma) and an appearance kernel over position and RGB (theta_alpha, theta_beta),
mean-field inference for a fixed number of iterations. Uses pydensecrf2.
"""

from __future__ import annotations

import numpy as np
import torch


class DenseCRF:
    """Refines class probabilities of one image with a dense CRF.

    Args:
        iterations: mean-field iterations (DeepLab: 10).
        pos_w, pos_xy_std: weight and spatial std (w2, theta_gamma) of the smoothness kernel.
        bi_w, bi_xy_std, bi_rgb_std: weight and stds (w1, theta_alpha, theta_beta) of the
            appearance kernel. DeepLab v2's VOC values: w1=4, alpha=121, beta=5, w2=3, gamma=3.
    """

    def __init__(self, iterations: int, pos_w: float, pos_xy_std: float, bi_w: float,
                 bi_xy_std: float, bi_rgb_std: float) -> None:
        try:
            import pydensecrf.densecrf  # noqa: F401
        except ImportError as err:  # pragma: no cover - it is a declared dependency
            raise ImportError("dense CRF needs pydensecrf2: pip install pydensecrf2") from err
        self.iterations = iterations
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


def denormalise(image: torch.Tensor, mean, std) -> np.ndarray:
    """Invert the dataset normalisation of a CxHxW tensor to uint8 HxWx3 (RGB channels)."""
    x = image[:3].detach().cpu().float()
    x = x * torch.as_tensor(std[:3]).view(3, 1, 1) + torch.as_tensor(mean[:3]).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
