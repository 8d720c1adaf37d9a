"""Compare segtrain's SPNet with the authors' code, with the weights copied across.

    python scripts/reference/compare_spnet.py --reference /path/to/SPNet
    python scripts/reference/compare_spnet.py --reference /path/to/SPNet --size 97 129
    python scripts/reference/compare_spnet.py --reference /path/to/SPNet --dtype float64
    python scripts/reference/compare_spnet.py --reference /path/to/SPNet --train
    python scripts/reference/compare_spnet.py --reference /path/to/SPNet \
        --reference-align-corners false   # a sensitivity check: must differ

``--reference`` is a checkout of houqb/SPNet (formerly Andrew-Qibin/SPNet; Hou, Zhang,
Cheng and Feng, "Strip Pooling", CVPR 2020). The files compared are its ``models/spnet.py``
(``SPNet``, ``SPHead``), ``models/customize.py`` (``StripPooling``, the MPM),
``models/resnet.py`` (``ResNet`` with ``deep_base=True``, ``Bottleneck``, ``SPBlock``, the
SPM), ``models/base.py`` (``BaseNet``: ResNet-101, dilated, ``multi_grid=True``,
``up_kwargs``) and ``models/fcn.py`` (``FCNHead``, the auxiliary head). That code is
self-contained (``torch.nn.BatchNorm2d`` is its ``norm_layer`` in ``tool/test.py``), so no
PyTorch-Encoding package and no compiled extension is needed; ``--encoding`` only puts a
PyTorch-Encoding checkout on ``sys.path`` should a fork import ``encoding``.

Steps: build the reference as ``tool/test.py`` does for ``config/cityscapes/
cityscapes_spnet101.yaml`` (``SPNet(nclass=19, backbone='resnet101', pretrained=None,
spm_on=True)``), give it random weights and non-trivial BatchNorm statistics (fixed seed),
build segtrain's model from ``experiment=spnet_cityscapes model.pretrained=null`` through
the framework's own config path, copy every reference tensor into it by ``map_key``, run
both in eval mode on the same random image (``--train``: training mode on a batch of 2,
dropout off), and print parameter counts, the mapping, and
the max absolute / relative differences of the logits, the auxiliary logits and the
intermediate features. Not imported by the tests (it needs the external checkout).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import REPO, n_params, record_outputs, segtrain_config
from torch import nn

sys.path.insert(0, str(REPO))

from segtrain.app import build_model  # noqa: E402

NUM_CLASSES = 19  # config/cityscapes/cityscapes_spnet101.yaml: classes 19

# reference key (regex) -> segtrain key; applied in order, the first match wins
KEY_RULES: list[tuple[str, str]] = [
    # backbone: BaseNet.pretrained -> SPNet.backbone; SPBlock -> StripPoolingModule
    (r"^pretrained\.(.*)\.spm\.conv1\.(.*)$", r"backbone.\1.gate.conv_h.0.\2"),
    (r"^pretrained\.(.*)\.spm\.bn1\.(.*)$", r"backbone.\1.gate.conv_h.1.\2"),
    (r"^pretrained\.(.*)\.spm\.conv2\.(.*)$", r"backbone.\1.gate.conv_v.0.\2"),
    (r"^pretrained\.(.*)\.spm\.bn2\.(.*)$", r"backbone.\1.gate.conv_v.1.\2"),
    (r"^pretrained\.(.*)\.spm\.conv3\.(.*)$", r"backbone.\1.gate.fuse.\2"),
    (r"^pretrained\.(.*)$", r"backbone.\1"),
    # SPHead
    (r"^head\.trans_layer\.(.*)$", r"reduce.\1"),
    (r"^head\.score_layer\.([01])\.(.*)$", r"head.0.\1.\2"),
    (r"^head\.score_layer\.4\.(.*)$", r"head.2.\1"),
    # FCNHead(1024) on layer3
    (r"^auxlayer\.conv5\.([01])\.(.*)$", r"aux_head.0.\1.\2"),
    (r"^auxlayer\.conv5\.4\.(.*)$", r"aux_head.2.\1"),
]

# StripPooling (MPM) submodule -> MixedPoolingModule submodule
MPM_NAMES = {
    "conv1_1": "reduce_short",   # 1x1 to the short-range (pyramid) half
    "conv1_2": "reduce_long",    # 1x1 to the long-range (strip) half
    "conv2_0": "short_conv",     # 3x3 at full resolution
    "conv2_1": "short_pools.0",  # 3x3 after pool1 (20 bins)
    "conv2_2": "short_pools.1",  # 3x3 after pool2 (12 bins)
    "conv2_3": "long_v",         # (1, 3) after pool3 = AdaptiveAvgPool2d((1, None))
    "conv2_4": "long_h",         # (3, 1) after pool4 = AdaptiveAvgPool2d((None, 1))
    "conv2_5": "short_out",
    "conv2_6": "long_out",
    "conv3": "project",
}

# (reference module, segtrain module) pairs whose outputs are compared
FEATURE_PAIRS = [
    ("pretrained.layer1", "backbone.layer1"),
    ("pretrained.layer2", "backbone.layer2"),
    ("pretrained.layer3", "backbone.layer3"),
    ("pretrained.layer4", "backbone.layer4"),
    ("head.trans_layer", "reduce"),
    ("head.strip_pool1", "mpm.0"),
    ("head.strip_pool2", "mpm.1"),
    ("head", "head"),
]


def map_key(ref_key: str) -> str | None:
    """segtrain's state-dict key of a reference key, or ``None`` if no rule covers it."""
    m = re.match(r"^head\.strip_pool([12])\.(\w+)\.(.*)$", ref_key)
    if m:
        index, sub, rest = m.groups()
        if sub in MPM_NAMES:
            return f"mpm.{int(index) - 1}.{MPM_NAMES[sub]}.{rest}"
        return None
    for pattern, target in KEY_RULES:
        if re.match(pattern, ref_key):
            return re.sub(pattern, target, ref_key)
    return None


def build_reference(checkout: Path, encoding: Path | None) -> nn.Module:
    """The authors' SPNet as ``tool/test.py`` builds it for Cityscapes, in eval mode."""
    if not (checkout / "models" / "spnet.py").is_file():
        raise SystemExit(f"--reference {checkout}: no models/spnet.py (expected a houqb/SPNet "
                         f"checkout)")
    for path in (encoding, checkout):
        if path is not None:
            sys.path.insert(0, str(path))
    from models.spnet import SPNet as ReferenceSPNet  # the checkout's package "models"

    return ReferenceSPNet(nclass=NUM_CLASSES, backbone="resnet101", pretrained=None,
                          spm_on=True).eval()


def build_segtrain(overrides: list[str]) -> nn.Module:
    """segtrain's SPNet from the Cityscapes experiment, through the framework's config path."""
    return build_model(segtrain_config(["experiment=spnet_cityscapes", "model.pretrained=null",
                                        f"dataset.num_classes={NUM_CLASSES}",
                                        *overrides])).eval()


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> None:
    """Fixed-seed weights: convolutions ~ N(0, 2 / fan_out) (the reference ResNet's init),
    conv biases small, BatchNorm affine and running statistics away from 1 / 0. The last
    BatchNorm of each residual branch (``bn3``) gets a smaller scale, so that activations
    stay O(1-100) through the 33 blocks instead of growing to ~1e6 (a test at that scale
    would hide small differences)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen) * std + mean

    def uniform(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=gen) * (high - low) + low

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            module.weight.copy_(normal(module.weight, (2.0 / fan_out) ** 0.5))
            if module.bias is not None:
                module.bias.copy_(normal(module.bias, 0.1))
        elif isinstance(module, nn.BatchNorm2d):
            low, high = (0.1, 0.3) if name.endswith(".bn3") else (0.5, 1.5)
            module.weight.copy_(uniform(module.weight, low, high))
            module.bias.copy_(normal(module.bias, 0.1))
            module.running_mean.copy_(normal(module.running_mean, 0.1))
            module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
            module.num_batches_tracked.fill_(7)


@torch.no_grad()
def copy_weights(reference: nn.Module, ours: nn.Module) -> tuple[list[str], list[str]]:
    """Copy every reference tensor into ``ours``; returns (unmapped reference keys,
    segtrain keys left unfilled). A shape mismatch is an error naming both keys."""
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    unmapped, filled = [], set()
    for ref_key, tensor in ref_state.items():
        key = map_key(ref_key)
        if key is None or key not in our_state:
            unmapped.append(f"{ref_key} -> {key}")
            continue
        if our_state[key].shape != tensor.shape:
            raise SystemExit(f"shape mismatch: reference {ref_key} {tuple(tensor.shape)} vs "
                             f"segtrain {key} {tuple(our_state[key].shape)}")
        our_state[key].copy_(tensor)
        filled.add(key)
    unfilled = [k for k in our_state if k not in filled]
    return unmapped, unfilled


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |a|)."""
    if a.shape != b.shape:
        raise SystemExit(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    err = (a - b).abs().max().item()
    return err, err / max(a.abs().max().item(), 1e-30)


def zero_loss(output: torch.Tensor, _target) -> torch.Tensor:
    """The reference's training forward needs a ``criterion``; its losses are not compared."""
    return output.new_zeros(())


def training_mode_without_dropout(reference: nn.Module, ours: nn.Module) -> None:
    """BatchNorm on batch statistics, the (random) dropout of both classifiers off."""
    for model in (reference, ours):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout2d):
                module.p = 0.0
    reference.criterion = zero_loss


@torch.no_grad()
def run_both(reference: nn.Module, ours: nn.Module, image: torch.Tensor) -> list[tuple]:
    """Rows (name, reference output, segtrain output): intermediates, aux logits, logits.

    In eval mode the reference returns the logits; in training it returns the argmax and
    the losses, so its logits are its head's output upsampled with its ``up_kwargs``, as its
    forward does. Our auxiliary head runs in training only; in eval it is applied to our
    layer3 output here (the reference computes ``auxlayer`` in eval too, ``BaseNet.aux``).
    """
    ref_store, ref_handles = record_outputs(
        reference, [r for r, _ in FEATURE_PAIRS] + ["auxlayer"])
    our_store, our_handles = record_outputs(ours, [o for _, o in FEATURE_PAIRS])
    size = image.shape[-2:]
    ref_out = reference(image.clone(), None) if reference.training else reference(image.clone())
    ours_out = ours(image.clone())
    for handle in ref_handles + our_handles:
        handle.remove()
    ref_logits = (F.interpolate(ref_store["head"], size, **reference._up_kwargs)
                  if reference.training else ref_out)
    our_aux = ours_out.get("aux")
    if our_aux is None:
        our_aux = F.interpolate(ours.aux_head(our_store["backbone.layer3"]), size,
                                mode="bilinear", align_corners=True)
    rows = [(f"{r} | {o}", ref_store[r], our_store[o]) for r, o in FEATURE_PAIRS]
    rows.append(("aux logits (auxlayer | aux_head, upsampled)",
                 F.interpolate(ref_store["auxlayer"], size, **reference._up_kwargs), our_aux))
    rows.append(("logits", ref_logits, ours_out["out"]))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="checkout of houqb/SPNet")
    parser.add_argument("--encoding", type=Path, default=None,
                        help="checkout of PyTorch-Encoding (not needed by houqb/SPNet)")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="float64 shows whether the float32 differences are rounding")
    parser.add_argument("--reference-align-corners", choices=("true", "false"), default="true",
                        help="false changes the reference's up_kwargs (every bilinear "
                             "upsampling: MPM pools and logits) to show that the comparison "
                             "sees that choice; true is the authors' code")
    parser.add_argument("--train", action="store_true",
                        help="training mode (BatchNorm on batch statistics, dropout off) "
                             "on a batch of 2 instead of eval mode on one image")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for segtrain")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reference = build_reference(args.reference.resolve(),
                                args.encoding.resolve() if args.encoding else None)
    randomise(reference, args.seed)
    # one dict shared by BaseNet, SPHead and both StripPooling modules (models/base.py)
    reference._up_kwargs["align_corners"] = args.reference_align_corners == "true"
    ours = build_segtrain(args.overrides)
    print(f"parameters: reference {n_params(reference):,}, segtrain {n_params(ours):,}")
    unmapped, unfilled = copy_weights(reference, ours)
    n_ref = len(reference.state_dict())
    print(f"tensors: reference {n_ref}, mapped {n_ref - len(unmapped)}, "
          f"unmapped {len(unmapped)} {unmapped}; segtrain unfilled {len(unfilled)} {unfilled}")
    dtype = getattr(torch, args.dtype)
    reference, ours = reference.to(dtype), ours.to(dtype)
    batch = 2 if args.train else 1
    image = torch.randn(batch, 3, *args.size, generator=torch.Generator().manual_seed(args.seed))
    image = image.to(dtype)
    if args.train:
        training_mode_without_dropout(reference, ours)
    mode = "training mode, dropout off" if args.train else "eval mode"
    print(f"input: {tuple(image.shape)}, {mode}, {args.dtype}, seed {args.seed}")
    print(f"{'output (reference | segtrain)':48s} {'shape':>20s} {'max|ref|':>10s} "
          f"{'max abs diff':>12s} {'rel diff':>9s}")
    for name, a, b in run_both(reference, ours, image):
        err, rel = diff(a, b)
        print(f"{name:48s} {str(tuple(a.shape)):>20s} {a.abs().max().item():10.4g} "
              f"{err:12.3e} {rel:9.2e}")


if __name__ == "__main__":
    main()
