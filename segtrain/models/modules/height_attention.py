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
   ``PE(p, 2i) = sin(p / base^(2i/C))``, ``PE(p, 2i+1) = cos(p / base^(2i/C))``, C the
   channels there; base 100 (the reference code's ``get_sinusoid_encoding_table`` for
   widths up to 50, instead of the Transformer's 10000), plus ``pe_offset`` (1 in the
   reference code, ``network/PosEmbedding.py`` ``PosEncoding1D``: ``table + 1``; 0 is the
   paper's formula). The table has H^ + 1 rows, p = 0..H^, as the reference's; p, the
   coarse row of each of the H^ rows of Z^, is (``coarse_row_index``):
   - given ``rows``, each input pixel's row in the full image as a fraction of its height
     (``dataset.source_rows``: 1.0 for padding), the reference's rule
     (``PosEncoding1D.forward``): the rows of column 0 sampled at the H^ rows by nearest
     neighbour, p = floor(fraction x H^) (the reference's ``row // 8 // pos_rfactor`` on
     its 1024-row frames; padding, its ``IGNORE_POS`` 128, is p = H^), and in training,
     with ``pos_noise`` s > 0, p + floor(N(0, s)) clamped to +-H^ // 8 (its
     ``16 // pos_rfactor``), then p clamped to 0..H^;
   - without ``rows``, p = 0..H^-1, the rows of the input the network sees (the same as
     the identity rows when H^ divides the input height, whole-image evaluation), with the
     same jitter in training;
5. linear up-sampling to H_h: A = G_up(A^), and X~_h = A (broadcast over the width) * X_h.

Dropout on Z^ (the reference code's ``--dropout``) is an option. Difference from the
reference code: its second conv also has a bias before BN (32 parameters more per module at
r = 64 on 1024 channels; the BN's mean absorbs it, the same function).
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


def coarse_row_index(rows: torch.Tensor, coarse_height: int, noise: float = 0.0) -> torch.Tensor:
    """(N, coarse_height) int64 rows of the encoding table from ``rows`` (N x H x W, each
    pixel's row in the full image as a fraction of its height, 1.0 for padding): column 0
    sampled by nearest neighbour, floor(fraction x coarse_height), plus the training jitter
    ``noise`` (std); shachoi/HANet network/PosEmbedding.py PosEncoding1D.forward."""
    if rows.dim() != 3:
        raise ValueError(f"rows must be N x H x W, got shape {tuple(rows.shape)}")
    column = rows[:, None, :, 0].float()  # N x 1 x H
    sampled = F.interpolate(column, size=coarse_height, mode="nearest")[:, 0]
    index = torch.floor(sampled * coarse_height).long().clamp(0, coarse_height)
    return jitter(index, coarse_height, noise)


def jitter(index: torch.Tensor, coarse_height: int, noise: float) -> torch.Tensor:
    """``index`` + floor(N(0, noise)) clamped to +-coarse_height // 8, then to 0..coarse_height
    (the reference's ``--pos_noise``: clamp 16 // pos_rfactor, pos_rfactor = 128 / H^)."""
    if noise <= 0:
        return index
    bound = coarse_height // 8
    shift = torch.floor(torch.randn(index.shape, device=index.device) * noise).long()
    return (index + shift.clamp(-bound, bound)).clamp(0, coarse_height)


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
        pos_noise: std of the coarse row's jitter in training (the reference's
            ``--pos_noise``, 0.5 in its scripts); 0: none.
    """

    def __init__(self, in_channels: int, out_channels: int, coarse_height: int, reduction: int,
                 kernel_size: int, dropout: float, pooling: str = "mean",
                 pe_base: float = 100.0, pe_offset: float = 1.0,
                 pos_noise: float = 0.0) -> None:
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        mid = math.ceil(in_channels / reduction)
        if pos_noise < 0:
            raise ValueError(f"pos_noise must be >= 0, got {pos_noise}")
        self.coarse_height, self.pooling, self.pos_noise = coarse_height, pooling, pos_noise
        self.dropout = nn.Dropout1d(dropout)
        self.conv1 = nn.Sequential(nn.Conv1d(in_channels, mid, 1, bias=False),
                                   nn.BatchNorm1d(mid), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv1d(mid, 2 * mid, 3, padding=1, bias=False),
                                   nn.BatchNorm1d(2 * mid), nn.ReLU(inplace=True))
        self.conv3 = nn.Conv1d(2 * mid, out_channels, kernel_size, padding=kernel_size // 2)
        # rows 0..H^ as the reference's table; row H^ only for padding and the jitter
        pe = positional_encoding(coarse_height + 1, mid, pe_base) + pe_offset
        self.register_buffer("pe", pe, persistent=False)

    def encoding(self, batch: int, rows: torch.Tensor | None) -> torch.Tensor:
        """The encoding of each coarse row (see the module docstring): (C, H^) for the
        input's own rows, (N, C, H^) for given rows or with the jitter."""
        noise = self.pos_noise if self.training else 0.0
        if rows is None and noise == 0:
            return self.pe[:, :self.coarse_height]
        if rows is None:
            index = jitter(torch.arange(self.coarse_height, device=self.pe.device)
                           .expand(batch, -1), self.coarse_height, noise)
        else:
            index = coarse_row_index(rows, self.coarse_height, noise)
        return self.pe[:, index].permute(1, 0, 2)  # N, C, H^

    def attention(self, low: torch.Tensor, height: int,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C_h, height) attention values in (0, 1)."""
        pool = F.adaptive_avg_pool2d if self.pooling == "mean" else F.adaptive_max_pool2d
        z = pool(low, (self.coarse_height, 1)).squeeze(3)  # B, C_l, H^
        q = self.conv1(self.dropout(z)) + self.encoding(low.shape[0], rows)
        a = torch.sigmoid(self.conv3(self.conv2(q)))  # B, C_h, H^
        return F.interpolate(a, size=height, mode="linear", align_corners=False)

    def forward(self, low: torch.Tensor, high: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``high`` re-weighted; ``rows``: N x H x W source rows of the network's input
        (fractions of the full image's height), None: the input's own rows."""
        return high * self.attention(low, high.shape[2], rows).unsqueeze(3)
