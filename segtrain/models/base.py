"""The model contract: what every segtrain network promises the rest of the code.

A model is a ``SegmentationModel`` (an ``nn.Module``) and the loss check, the optimizer,
the evaluator and the trainer use nothing else of it:

- ``forward(image)`` takes an ``N x C x H x W`` float batch and returns a dict of tensors.
  ``"out"`` is always there: logits ``N x num_classes x H x W`` at the input resolution.
  In training mode (``model.train()``) the dict has exactly ``model.train_keys``: ``"out"``
  and what a loss needs (``"out_lowres"`` logits before the final upsampling for
  ``loss.label_stride``, ``"aux"`` of an auxiliary head, CPNet's ``"prior"``, DSRL's
  ``"sr"``, ``"fa_seg"``, ``"fa_sr"``, the MSC wrapper's ``"scales"``: a mapping from each
  input scale to that scale's own ``{"out", ["out_lowres"]}``). In
  eval mode it has exactly ``EVAL_KEYS``, ``{"out"}``: inference never pays for what only
  training uses. ``output_keys`` is the set of the current mode.
- ``TRAIN_KEYS`` (class constant): every key a model of the class can return in training,
  its optional heads included. ``app.models_that_fit`` reads it from the classes of
  ``conf/model`` without building them, to name the models a loss can train.
  ``train_keys`` (per instance): ``TRAIN_KEYS`` less the outputs of heads this instance was
  built without (``aux_channels=0``); ``app.check_outputs`` compares it with the loss's
  ``required_keys`` at start-up.
- ``param_groups(mults)``: the optimizer groups, every trainable parameter in exactly one
  (``segtrain.models.param_groups``: role x kind, with ``lr_mult`` and
  ``weight_decay_mult``). The default is one role at the base rate (a network trained from
  scratch or at one rate); a network with a pretrained backbone and new layers overrides it
  with the multipliers of its reference.
- Output stride: ``output_stride`` is the stride of the backbone's last feature map (the
  DeepLab v3 definition, the value ``model.output_stride`` and ``eval.output_stride`` name),
  ``None`` for encoder-decoders that fuse several strides (FCN, SegNet, U-Net). Where
  ``CAN_SET_OUTPUT_STRIDE`` is true, ``set_output_stride(s)`` re-dilates the network in
  place with the same parameters (DeepLab v3 Sec. 4.2: train at 16, evaluate at 8);
  elsewhere it raises ``ConfigError``.

- Source rows: where ``TAKES_ROWS`` (HANet), ``forward(image, rows=None)`` also takes
  ``rows``, ``N x H x W`` float: each input pixel's row in the full image as a fraction of
  its height (1.0 for padding), which the training set adds as ``batch["rows"]`` with
  ``dataset.source_rows: true``; the trainer passes them, sliding-window inference passes
  each window's rows; None stands for the input's own rows. Other models take the image
  only.

- ``freeze_bn``: ``set_freeze_bn(True)`` keeps every BatchNorm of the network at its
  statistics and affine weights (DeepLab v2 Sec. 4.1 and v3 Sec. 4.1's second stage), in
  training mode too (``train()`` re-freezes them); a network calls it once its layers exist.

Wrappers: ``bare(model)`` is the ``SegmentationModel`` under ``DistributedDataParallel``
(or ``DataParallel``); its ``state_dict`` is the one checkpoints hold. The multi-scale
wrapper (``segtrain.models.msc.MultiScaleInputs``) is itself a ``SegmentationModel``: it
adds its per-scale keys and delegates groups and output stride to the network it wraps.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from segtrain.errors import ConfigError
from segtrain.models.param_groups import ParamMults, single_group


class SegmentationModel(nn.Module):
    """Base class of every segtrain network; the module docstring is the contract."""

    #: every key a model of this class can return in training mode
    TRAIN_KEYS: ClassVar[frozenset[str]] = frozenset({"out"})
    #: the keys every model returns in eval mode
    EVAL_KEYS: ClassVar[frozenset[str]] = frozenset({"out"})
    #: whether ``set_output_stride`` works
    CAN_SET_OUTPUT_STRIDE: ClassVar[bool] = False
    #: whether ``forward`` takes ``rows``, the source rows of the input (HANet)
    TAKES_ROWS: ClassVar[bool] = False

    @property
    def train_keys(self) -> frozenset[str]:
        """The keys this instance returns in training mode (``TRAIN_KEYS`` unless it was
        built without an optional head)."""
        return self.TRAIN_KEYS

    @property
    def output_keys(self) -> frozenset[str]:
        """The keys ``forward`` returns in the current mode."""
        return self.train_keys if self.training else self.EVAL_KEYS

    #: every BatchNorm fixed (``set_freeze_bn``)
    freeze_bn: bool = False

    def set_freeze_bn(self, freeze_bn: bool) -> None:
        """Keep every BatchNorm's statistics and affine weights fixed (or not); called once
        every layer exists."""
        self.freeze_bn = freeze_bn
        if freeze_bn:
            freeze_batchnorm(self)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.freeze_bn:
            freeze_batchnorm(self)
        return self

    def param_groups(self, mults: ParamMults | None = None) -> list[dict]:
        """One role (``all``) at the base rate, split by kind (``single_group``)."""
        return single_group(self, mults)

    @property
    def output_stride(self) -> int | None:
        """The backbone's output stride; ``None``: no single one (encoder-decoders)."""
        return None

    def set_output_stride(self, output_stride: int) -> None:
        """Re-dilate in place; only where ``CAN_SET_OUTPUT_STRIDE``."""
        stride = "no single output stride" if self.output_stride is None \
            else f"output stride {self.output_stride}"
        raise ConfigError(f"output stride {output_stride}: {type(self).__name__} cannot change "
                          f"its output stride (built with {stride}; only models with "
                          f"CAN_SET_OUTPUT_STRIDE can)")


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode and stop its affine parameters' gradients
    (``SegmentationModel.set_freeze_bn``; ``train()`` calls it again)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def bare(model: nn.Module) -> nn.Module:
    """The model under ``DistributedDataParallel`` / ``DataParallel`` (itself otherwise): the
    ``SegmentationModel`` whose contract and ``state_dict`` the caller wants."""
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model
