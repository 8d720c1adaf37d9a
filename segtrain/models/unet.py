"""U-Net (Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015, Sec. 2 and Fig. 1).

Contracting path: four stages of two unpadded 3x3 convolutions + ReLU followed by 2x2
max pooling, doubling the channels from 64 to 1024 at the bottom. Expansive path: 2x2
"up-convolution" halving the channels, concatenation with the cropped feature map of the
same level, two 3x3 convolutions + ReLU; a final 1x1 convolution gives the class scores.
Weights start from a Gaussian with standard deviation sqrt(2/N), N the number of incoming
nodes of one neuron (Sec. 3); dropout sits at the end of the contracting path (Sec. 3.1),
here on the outputs of the two deepest stages.

``padding="valid"`` is the paper's net: each 3x3 conv loses a 1-pixel border, so the
output is 184 pixels smaller than the input (572 -> 388 in Fig. 1). The input is mirrored
at its borders ("overlap-tile strategy", Fig. 2) up to the next size the net accepts and
the output is cropped, so logits cover exactly the input. ``padding="same"`` pads every
convolution by 1 (a common variant); the input is mirrored up to a multiple of 16.
With one input channel and two classes the paper's net has 31,030,658 parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from segtrain.models.base import SegmentationModel

DEPTH = 4  # max-pool downsamplings of the paper's net
# Valid-mode geometry: with b the bottom feature size, the input is 16b + 124 and the output
# 16b - 60 (four levels of two 3x3 convs and a 2x2 pool); output pixel i sees input i + 92.
VALID_BORDER = 92


def _reflect_index(size: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Source index of every padded position under mirroring without edge repetition.

    The mirrored extension is even and periodic with period 2 * (size - 1), so pads of any
    width are defined (numpy's ``np.pad(mode="reflect")`` gives the same).
    """
    i = torch.arange(-before, size + after, device=device)
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = i.remainder(period)
    return torch.where(i < size, i, period - i)


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Mirror ``x`` (N, C, H, W) at its borders by any amount (overlap-tile, Fig. 2)."""
    x = x.index_select(2, _reflect_index(x.shape[2], top, bottom, x.device))
    return x.index_select(3, _reflect_index(x.shape[3], left, right, x.device))


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    dy, dx = (x.shape[2] - height) // 2, (x.shape[3] - width) // 2
    return x[:, :, dy:dy + height, dx:dx + width]


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (BatchNorm and) ReLU."""

    def __init__(self, in_channels: int, out_channels: int, padding: int,
                 batch_norm: bool) -> None:
        layers: list[nn.Module] = []
        for ch in (in_channels, out_channels):
            layers.append(nn.Conv2d(ch, out_channels, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UpBlock(nn.Module):
    """2x2 up-convolution, concatenation with the cropped skip, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, padding: int,
                 batch_norm: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, 2)
        self.conv = DoubleConv(2 * out_channels, out_channels, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = _center_crop(skip, x.shape[2], x.shape[3])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(SegmentationModel):
    """U-Net with four downsamplings.

    Args:
        num_classes: number of classes (2 in the paper's cell-segmentation experiments).
        padding: ``"valid"`` (the paper: unpadded convs + overlap-tile mirroring) or
            ``"same"`` (padded convs).
        base_channels: channels of the first stage (64 in the paper), doubled per stage.
        batch_norm: BatchNorm after every 3x3 conv (not in the paper).
        dropout: dropout probability at the end of the contracting path.
        in_channels: input channels (1 for the paper's grey-scale microscopy).

    Trained from scratch: no head (the contract's default ``head_modules``).
    """

    def __init__(self, num_classes: int, padding: str, base_channels: int, batch_norm: bool,
                 dropout: float, in_channels: int = 3) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding
        pad = 1 if padding == "same" else 0
        widths = [base_channels * 2 ** i for i in range(DEPTH + 1)]  # 64 .. 1024
        self.encoders = nn.ModuleList()
        ch = in_channels
        for width in widths:
            self.encoders.append(DoubleConv(ch, width, pad, batch_norm))
            ch = width
        self.pool = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(dropout)
        self.decoders = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], pad, batch_norm) for i in reversed(range(DEPTH))
        )
        self.classifier = nn.Conv2d(base_channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # N = incoming nodes of one neuron = k * k * C_in (Sec. 3)
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                # each output pixel of a 2x2 stride-2 up-conv sees C_in inputs
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_channels))
                nn.init.zeros_(m.bias)

    def _pad_amounts(self, size: int) -> tuple[int, int, int]:
        """(pad before, pad after, crop start in the output) along one axis."""
        if self.padding == "same":
            total = -size % 2 ** DEPTH
            return total // 2, total - total // 2, total // 2
        bottom = max(3, math.ceil((size + 60) / 16))  # smallest valid net covering ``size``
        out = 16 * bottom - 60
        before = VALID_BORDER + (out - size) // 2
        after = 16 * bottom + 124 - size - before
        return before, after, before - VALID_BORDER

    def forward_tile(self, x: torch.Tensor) -> torch.Tensor:
        """The network of Fig. 1 on one tile: in valid mode a 572x572 tile gives 388x388."""
        skips = []
        for i, encoder in enumerate(self.encoders):
            if i > 0:
                x = self.pool(x)
            x = encoder(x)
            if i >= DEPTH - 1:
                x = self.dropout(x)
            skips.append(x)
        skips.pop()  # the bottom stage feeds the decoder directly
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        return self.classifier(x)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]
        top, bottom, y0 = self._pad_amounts(h)
        left, right, x0 = self._pad_amounts(w)
        x = self.forward_tile(mirror_pad(image, top, bottom, left, right))
        return {"out": x[:, :, y0:y0 + h, x0:x0 + w]}
