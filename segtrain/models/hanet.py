"""HANet: DeepLab v3+'s parts with height-driven attention.

Choi, Kim and Choo, "Cars Can't Fly up in the Sky: Improving Urban-Scene Segmentation via
Height-driven Attention Networks", CVPR 2020. Sec. 3.3 and Fig. 4: HANet modules
(``modules.height_attention``) attach to DeepLab v3+ on a ResNet-101 at output stride 8;
each takes a lower-level feature map and re-weights the next, higher-level one. The five
places ("layer1" .. "layer5" in the paper's study of where to attach HANet and in the
authors' code shachoi/HANet ``network/deepv3.py``), as (lower -> higher):

- ``layer1``: ResNet stage 4 (``c4``) -> stage 5 (``c5``);
- ``layer2``: ``c5`` -> the concatenated ASPP branches (before the 1x1 projection);
- ``layer3``: the concatenated ASPP branches -> the ASPP projection (256);
- ``layer4``: the decoder input (upsampled ASPP + 48 low-level channels) -> decoder output;
- ``layer5``: the decoder output -> the class scores (max pooling, as the reference code).

The best Cityscapes model attaches at layer1-4 (the authors' best script
``scripts/train_r101_os8_hanet_best.sh``: ``--hanet 1 1 1 1 0``, r = 64, H^ = 128 / 8 =
16, 3 conv layers with kernel 3, positional encoding after the first conv, plus 1 as the
reference's table, dropout 0.1),
``conf/model/hanet.yaml``. The backbone is the reference's: ResNet-101 with the deep stem
(``resnet101s``: three 3x3 convolutions 64-64-128, ``network/Resnet.py`` ``ResNet3X3``,
CSAIL's ImageNet weights) whose layer3 and layer4 are dilated 2 and 4 in every block, the
first included (``contract_dilation=False``; ``network/deepv3.py`` variant D sets every
``conv2`` of the stage). The auxiliary head on ``c4`` (3x3 conv 512 + BN + ReLU + dropout
0.1 + 1x1, the reference ``dsn``) is returned as ``"aux"`` in training mode at stride 8,
not upsampled: the loss compares it with the labels downsampled by nearest neighbour to
its size, as the reference does (row floor(i H / h), ``F.interpolate(mode='nearest')``:
``loss.label_grid=floor``, set by ``experiment=hanet_cityscapes``); its 0.4 weight belongs
to the loss config.

With ``conf/model/hanet.yaml`` and 19 classes the model has 64,801,250 parameters; the
reference code builds 64,803,149 (``tests/test_models_zoo_cvpr2020.py`` counts the
difference). Remaining differences from the reference code, one per line:

- positional encoding: a fixed buffer here, a frozen ``nn.Embedding`` there (parameters
  it counts: 17 x 73 = 1,241 over the four modules); both (16 + 1) rows of the same values
  (sinusoid + 1), the 17th reached by padded rows and the training jitter;
- HANet's second 1-D conv has a bias before its BN there (2 x 73 = 146 parameters);
- the auxiliary head's 3x3 conv has a bias before its BN there (512 parameters); a BN's
  running mean absorbs such a bias, and the batch mean cancels it in training;
- concatenation orders: ASPP puts image pooling last here, first there; the decoder puts
  the upsampled ASPP features before the 48 low-level channels here, after them there
  (a permutation of the input channels of the next convolution, same function);
- HANet's dropout drops whole channels of the pooled map here (``Dropout1d``); the
  reference applies ``Dropout2d`` to the 3-D map, which torch also treats as channel-wise
  1-D dropout (the same function).

The encoding is indexed by each pixel's row in the full image, as the reference's (its
datasets carry position maps through the joint transforms): ``forward(image, rows)`` takes
them (``TAKES_ROWS``; the trainer passes ``batch["rows"]``, which the training set adds
with ``dataset.source_rows: true``, set by ``experiment=hanet_cityscapes``), and the
training jitter ``pos_noise`` (the reference's ``--pos_noise 0.5``) moves each module's
coarse row index (``modules.height_attention``). Without rows (``model=hanet`` on another
dataset config, whole-image inference) the network's input rows stand in for them: the same
when the input is the whole image.

``scripts/reference/compare_hanet.py`` copies the reference's weights into this model and
compares the logits (``docs/reference/hanet.md``): they agree to float precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segtrain.errors import ConfigError
from segtrain.models.backbones.build import RESNETS
from segtrain.models.deeplabv3 import ASPP_CHANNELS, AtrousEncoder, plus_decoder, upsample
from segtrain.models.modules.heads import FCNHead
from segtrain.models.modules.height_attention import HeightAttention

STAGES = ("layer1", "layer2", "layer3", "layer4", "layer5")


class HANet(AtrousEncoder):
    """The atrous encoder (backbone + ASPP), DeepLab v3+'s decoder parts and HANet modules at
    the ``attach`` stages, plus an optional auxiliary head; the module names (and so the
    ``state_dict`` keys) are DeepLab v3+'s plus ``attention.<stage>`` and ``aux_head``.

    Args:
        num_classes: number of classes.
        backbone: ``resnet101`` in the paper (any ``build_backbone`` name works).
        output_stride: 8 in the paper's best model.
        multi_grid: unit rates of the last stage or ``None``.
        contract_dilation: ``False`` (the reference) dilates the first block of layer3 and
            layer4 like the others; ``True`` keeps the previous dilation there (torchvision).
        atrous_rates: ASPP rates at output stride 16 (``(6, 12, 18)``, doubled at 8).
        aspp_dropout: dropout after the ASPP projection (none in the reference code).
        separable: depthwise separable ASPP and decoder.
        low_level_channels: reduced low-level channels (48).
        decoder_channels: channels of the decoder's 3x3 convs (256).
        attach: stages among ``STAGES`` that get a HANet module.
        coarse_height: H^, rows of the coarse attention map.
        reduction: channel reduction ratio r of HANet's first convolution.
        kernel_size: kernel of HANet's last 1-D convolution.
        hanet_dropout: dropout on HANet's pooled input.
        pe_base: base of the positional encoding's wavelengths.
        pe_offset: constant added to the encoding (1 in the reference code, 0 the paper's).
        pos_noise: std of the training jitter of the encoding's coarse row (the reference's
            ``--pos_noise``); 0: none.
        aux_channels: channels of the auxiliary head on ``c4``; 0 or ``None`` removes it.
        aux_dropout: dropout of the auxiliary head.
        pretrained: ImageNet checkpoint of the backbone or ``None``.
        in_channels: input channels.
        head_lr_mult, head_bias_lr_mult: learning-rate multiples of the new layers.
    """

    TRAIN_KEYS = frozenset({"out", "aux"})
    TAKES_ROWS = True

    def __init__(self, num_classes: int, backbone: str, output_stride: int,
                 multi_grid: Sequence[int] | None, contract_dilation: bool,
                 atrous_rates: Sequence[int], aspp_dropout: float, separable: bool,
                 low_level_channels: int, decoder_channels: int, attach: Sequence[str],
                 coarse_height: int,
                 reduction: int, kernel_size: int, hanet_dropout: float, pe_base: float,
                 aux_channels: int | None, aux_dropout: float, pretrained: str | None,
                 in_channels: int = 3, head_lr_mult: float = 1.0,
                 head_bias_lr_mult: float = 1.0, pe_offset: float = 1.0,
                 pos_noise: float = 0.0) -> None:
        unknown = [s for s in attach if s not in STAGES]
        if unknown or len(set(attach)) != len(attach):
            raise ConfigError(f"model.attach must list distinct stages among "
                              f"{', '.join(STAGES)}; got {list(attach)}")
        if coarse_height < 1 or reduction < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"model.coarse_height and model.reduction must be positive and "
                              f"model.kernel_size odd; got {coarse_height}, {reduction}, "
                              f"{kernel_size}")
        if pos_noise < 0:
            raise ConfigError(f"model.pos_noise must be >= 0, got {pos_noise}")
        if not contract_dilation and backbone not in RESNETS:
            raise ConfigError(f"model.contract_dilation=false needs a ResNet backbone, "
                              f"got model.backbone={backbone}")
        super().__init__(backbone, output_stride, multi_grid, atrous_rates, aspp_dropout,
                         separable, pretrained, in_channels, contract_dilation)
        self.head_lr_mult, self.head_bias_lr_mult = head_lr_mult, head_bias_lr_mult
        ch = self.backbone.feature_channels
        self.reduce, self.decoder = plus_decoder(ch["c2"], low_level_channels,
                                                 decoder_channels, separable)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        lower_higher = {
            "layer1": (ch["c4"], ch["c5"]),
            "layer2": (ch["c5"], self.aspp.pyramid_channels),
            "layer3": (self.aspp.pyramid_channels, ASPP_CHANNELS),
            "layer4": (ASPP_CHANNELS + low_level_channels, decoder_channels),
            "layer5": (decoder_channels, num_classes),
        }
        self.attention = nn.ModuleDict({
            stage: HeightAttention(*lower_higher[stage], coarse_height, reduction, kernel_size,
                                   hanet_dropout, "max" if stage == "layer5" else "mean",
                                   pe_base, pe_offset, pos_noise)
            for stage in STAGES if stage in attach})
        self.aux_head = FCNHead(ch["c4"], aux_channels, num_classes, aux_dropout) \
            if aux_channels else None

    @property
    def train_keys(self) -> frozenset[str]:
        return self.TRAIN_KEYS if self.aux_head is not None else frozenset({"out"})

    def _attend(self, stage: str, low: torch.Tensor, high: torch.Tensor,
                rows: torch.Tensor | None) -> torch.Tensor:
        return self.attention[stage](low, high, rows) if stage in self.attention else high

    def forward(self, image: torch.Tensor,
                rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``rows``: N x H x W, each input pixel's row in the full image as a fraction of
        its height (1.0 for padding; ``dataset.source_rows``); None: the input's own rows."""
        size = image.shape[-2:]
        if rows is not None and (rows.dim() != 3 or rows.shape[0] != image.shape[0]
                                 or rows.shape[1:] != size):
            raise ValueError(f"rows must be N x H x W = {image.shape[0]} x {size[0]} x "
                             f"{size[1]} like the image, got shape {tuple(rows.shape)}")
        feats = self.backbone.forward_features(image)
        c5 = self._attend("layer1", feats["c4"], feats["c5"], rows)
        pyramid = self._attend("layer2", c5, self.aspp.pyramid(c5), rows)
        aspp = self._attend("layer3", pyramid, self.aspp.project(pyramid), rows)
        low = self.reduce(feats["c2"])
        decoder_in = torch.cat([upsample(aspp, low.shape[-2:]), low], dim=1)
        x = self._attend("layer4", decoder_in, self.decoder(decoder_in), rows)
        logits = self._attend("layer5", x, self.classifier(x), rows)
        outputs = {"out": upsample(logits, size)}
        if self.training and self.aux_head is not None:
            outputs["aux"] = self.aux_head(feats["c4"])  # at stride 8, as the reference
        return outputs

    def _new_layers(self) -> list[nn.Module]:
        extra = [self.aux_head] if self.aux_head is not None else []
        return [self.aspp, self.reduce, self.decoder, self.classifier, self.attention, *extra]
