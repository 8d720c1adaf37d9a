"""The height-driven attention module of HANet.

Choi, Kim and Choo, "Cars Can't Fly up in the Sky: Improving Urban-Scene Segmentation via
Height-driven Attention Networks", CVPR 2020, Sec. 3.1-3.2 and Fig. 2 (its notation
X_l, Z, Z^, Q_n, A^, A, X_h, X~_h is used below). From a lower-level
feature map X_l (C_l x H_l x W_l) it computes an attention map A (C_h x H_h) that
multiplies a higher-level map X_h (C_h x H_h x W_h), the same value along each row:

1.-2. width-wise pooling and down-sampling to the coarse height, Z^ = G_down(G_pool(X_l)),
   C_l x H^, in one adaptive pooling to (H^, 1) as the authors' code does (shachoi/HANet
   ``HANet_Conv.rowpool``): ``"mean"`` (the reference's default) averages each band of
   rows over the whole width, i.e. the mean over the width, then over the band;
   ``"max"`` (the reference's choice at layer5) takes the maximum over each band of rows
   and the whole width (not the mean over the band of the row maxima, which agrees only
   when every band is one row, H_l = H^);
3. N = 3 1-D convolutions: 1x1 to ceil(C_l / r) channels + BN + ReLU, 3x3 to
   twice that + BN + ReLU, ``kernel_size`` to C_h, then a sigmoid: A^, C_h x H^;
4. sinusoidal positional encoding (Sec. 3.2) added to Q_1, the output of the first
   convolution (the reference ``--hanet_pos 2 1``: injection point 2, sinusoidal):
   ``PE(p, 2i) = sin(p / base^(2i/C))``, ``PE(p, 2i+1) = cos(p / base^(2i/C))``,
   p = 0..H^-1 the coarse row and C the channels there; base 100 (the reference code's
   ``get_sinusoid_encoding_table`` for widths up to 50, instead of the Transformer's
   10000), plus ``pe_offset`` (1 in the reference code, ``network/PosEmbedding.py``
   ``PosEncoding1D``: ``table + 1``; 0 is the paper's formula);
5. linear up-sampling to H_h: A = G_up(A^), and X~_h = A (broadcast over the width) * X_h.

Dropout on Z^ (the reference code's ``--dropout``) is an option. Differences from the
reference code: its encoding is indexed by the crop's row in the full image (with random
jitter, ``--pos_noise``); here p is the coarse row of the input the network sees, without
jitter (the same rows when the input is the whole image). Its second conv also has a bias
before BN (32 parameters more per module at r = 64 on 1024 channels; the BN's mean absorbs
it, the same function).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def positional_encoding(length: int, channels: int, base: float) -> torch.Tensor:
    """(channels, length) sinusoidal encoding; rows 2i are sines, rows 2i+1 cosines."""
    position = torch.arange(length, dtype=torch.float64)
    exponent = 2 * torch.div(torch.arange(channels), 2, rounding_mode="floor") / channels
    angle = position[None, :] / base ** exponent.to(torch.float64)[:, None]
    pe = torch.where(torch.arange(channels)[:, None] % 2 == 0, angle.sin(), angle.cos())
    return pe.float()


class HeightAttention(nn.Module):
    """HANet: attention map (one value per channel and row) from ``low`` applied to ``high``.

    Args:
        in_channels: channels C_l of the lower-level feature map.
        out_channels: channels C_h of the higher-level feature map.
        coarse_height: H^, rows of the coarse attention map (16 in the paper).
        reduction: channel reduction ratio r of the first convolution.
        kernel_size: kernel of the last 1-D convolution.
        dropout: dropout on the pooled map (whole channels).
        pooling: ``"mean"`` or ``"max"`` width-wise pooling.
        pe_base: base of the positional encoding's wavelengths (100).
        pe_offset: constant added to the encoding (the reference code's 1; 0 the paper's).
    """

    def __init__(self, in_channels: int, out_channels: int, coarse_height: int, reduction: int,
                 kernel_size: int, dropout: float, pooling: str = "mean",
                 pe_base: float = 100.0, pe_offset: float = 1.0) -> None:
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        mid = math.ceil(in_channels / reduction)
        self.coarse_height, self.pooling = coarse_height, pooling
        self.dropout = nn.Dropout1d(dropout)
        self.conv1 = nn.Sequential(nn.Conv1d(in_channels, mid, 1, bias=False),
                                   nn.BatchNorm1d(mid), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv1d(mid, 2 * mid, 3, padding=1, bias=False),
                                   nn.BatchNorm1d(2 * mid), nn.ReLU(inplace=True))
        self.conv3 = nn.Conv1d(2 * mid, out_channels, kernel_size, padding=kernel_size // 2)
        pe = positional_encoding(coarse_height, mid, pe_base) + pe_offset
        self.register_buffer("pe", pe, persistent=False)

    def attention(self, low: torch.Tensor, height: int) -> torch.Tensor:
        """(B, C_h, height) attention values in (0, 1)."""
        pool = F.adaptive_avg_pool2d if self.pooling == "mean" else F.adaptive_max_pool2d
        z = pool(low, (self.coarse_height, 1)).squeeze(3)  # B, C_l, H^
        q = self.conv1(self.dropout(z)) + self.pe
        a = torch.sigmoid(self.conv3(self.conv2(q)))  # B, C_h, H^
        return F.interpolate(a, size=height, mode="linear", align_corners=False)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return high * self.attention(low, high.shape[2]).unsqueeze(3)
