"""Multi-scale inputs with max fusion, as DeepLab v2 trains and tests (Chen et al., TPAMI
2017, Sec. 4.1 "Multi-scale inputs", and the released ResNet-101 MSC prototxts): one network
with shared weights runs on the input resized by each scale (1, 0.75, 0.5 in the paper);
the outputs are bilinearly resized to the 1.0 scale's resolution and fused by taking the
maximum per position and class, in fp32 (under bf16/fp16 autocast too). The training loss
is the sum of the cross-entropy of each scale's output and of the fused output
(``segtrain.losses.ce``).

Outputs of ``MultiScaleInputs(model, scales)`` in training (its ``train_keys``):

- ``"out"``: the max fusion at the input resolution (what the 1.0 scale gives);
- ``"scales"``: ``{scale: {"out": ..., ["out_lowres": ...]}}``, each scale's own logits at
  its own resolution (``outputs["scales"][0.75]["out"]``), which the loss compares with the
  label resized to that size;
- when the model returns logits before the final upsampling (``"out_lowres"``, for
  ``loss.label_stride``): ``"out_lowres"`` fused at the 1.0 scale's low resolution (the
  released prototxt fuses there), and each scale's in ``"scales"``;
- the model's other outputs (``"aux"``, ...) from the 1.0 scale.

In evaluation, as every model (``segtrain.models.base``), only the fused ``"out"``. The
wrapper is a ``SegmentationModel`` whose parameter groups and output stride are the wrapped
network's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from segtrain.errors import ConfigError
from segtrain.models.base import SegmentationModel
from segtrain.models.param_groups import ParamMults

FUSED_KEYS = ("out", "out_lowres")


class MultiScaleInputs(SegmentationModel):
    """Wraps ``model`` to run it at several input scales and max-fuse the logits.

    Args:
        model: the network, a ``SegmentationModel``.
        scales: input scales; must contain 1.0 (the fused outputs are at its resolution).
    """

    def __init__(self, model: SegmentationModel, scales: Sequence[float]) -> None:
        super().__init__()
        if not isinstance(model, SegmentationModel):
            raise TypeError(f"MultiScaleInputs wraps a SegmentationModel, got "
                            f"{type(model).__name__}")
        scales = [float(s) for s in scales]
        if not scales or any(s <= 0 for s in scales) or len(set(scales)) != len(scales):
            raise ConfigError(f"model.msc.train_scales must be distinct positive scales, "
                              f"got {scales}")
        if 1.0 not in scales:
            raise ConfigError(f"model.msc.train_scales must include 1.0 (the fused output is "
                              f"at the 1.0 scale's resolution), got {scales}")
        self.model, self.scales = model, scales

    @property
    def train_keys(self) -> frozenset[str]:
        """The network's keys and ``"scales"``, the per-scale logits."""
        return self.model.train_keys | {"scales"}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        for s in self.scales:
            x = image if s == 1.0 else F.interpolate(image, scale_factor=s, mode="bilinear",
                                                     align_corners=False)
            outputs[s] = self.model(x)
        result = {k: v for k, v in outputs[1.0].items() if k not in FUSED_KEYS}
        if self.training:
            result["scales"] = {s: {k: outputs[s][k] for k in FUSED_KEYS if k in outputs[s]}
                                  for s in self.scales}
        for key in FUSED_KEYS:
            if key not in outputs[1.0]:
                continue
            size = outputs[1.0][key].shape[-2:]
            fused = None
            for s in self.scales:
                logits = outputs[s][key].float()
                if logits.shape[-2:] != size:
                    logits = F.interpolate(logits, size=size, mode="bilinear",
                                           align_corners=False)
                fused = logits if fused is None else torch.maximum(fused, logits)
            result[key] = fused
        return result

    def param_groups(self, mults: ParamMults | None = None) -> list[dict]:
        return self.model.param_groups(mults)

    @property
    def CAN_SET_OUTPUT_STRIDE(self) -> bool:  # the wrapped network's, unlike other models'
        return self.model.CAN_SET_OUTPUT_STRIDE

    @property
    def output_stride(self) -> int | None:
        return self.model.output_stride

    def set_output_stride(self, output_stride: int) -> None:
        """Re-dilate the wrapped network; a ``ConfigError`` where it cannot."""
        self.model.set_output_stride(output_stride)
