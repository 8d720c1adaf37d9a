"""Test-time prediction: whole image, sliding window, multi-scale fusion and flipping.

- ``whole``: one forward on the full image.
- ``slide``: overlapping crops of ``crop_size`` every ``stride`` pixels, logits averaged
  where crops overlap (mmsegmentation's ``slide`` test mode; PSPNet Sec. 4).
- multi-scale: the image is resized by each of ``scales``, predicted, and the logits are
  brought back to the original size and fused by ``max`` (DeepLab v2 Sec. 4.1, "MSC ...
  we take the maximum response across scales") or ``mean``.
- ``flip``: the horizontally flipped prediction is flipped back and averaged in.

Every network output is cast to fp32 before it is summed, averaged, resized or max-fused,
so a forward pass under bf16/fp16 autocast (``eval.precision``) rounds only the network's
own computation, never the fusion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


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
        if mode not in ("whole", "slide"):
            raise ValueError(f"eval.mode must be 'whole' or 'slide', got {mode!r}")
        if fusion not in ("max", "mean"):
            raise ValueError(f"eval.fusion must be 'max' or 'mean', got {fusion!r}")
        if mode == "slide" and (crop_size is None or stride is None):
            raise ValueError("eval.mode=slide needs eval.crop_size and eval.stride")
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
        ch, cw = self.crop_size
        sh, sw = self.stride
        # pad small images up to one crop (zeros = the normalised mean)
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph))
        H, W = image.shape[-2:]
        rows = list(range(0, max(H - ch, 0) + 1, sh))
        cols = list(range(0, max(W - cw, 0) + 1, sw))
        if rows[-1] + ch < H:
            rows.append(H - ch)
        if cols[-1] + cw < W:
            cols.append(W - cw)
        logits = None
        count = torch.zeros(1, 1, H, W, device=image.device)
        for y in rows:
            for x in cols:
                out = model(image[:, :, y:y + ch, x:x + cw])["out"].float()
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
