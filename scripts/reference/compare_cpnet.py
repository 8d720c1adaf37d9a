"""Compare segtrain's CPNet with the authors' ContextPrior code, weights copied across.

Reference (yu-changqian/ContextPrior, the authors' mmsegmentation plug-in):
``decode_head/cp_head.py`` (``CPHead``, ``AggregationModule``, the ideal affinity map),
``loss/affinity_loss.py`` (``AffinityLoss``) and ``config/cpnet_r50-d8.py`` (the model:
``ResNetV1c`` + ``CPHead`` + auxiliary ``FCNHead``), built on mmsegmentation 0.x
(``ResNetV1c``, ``FCNHead``, ``BaseDecodeHead``, ``EncoderDecoder``) and mmcv 1.x
(``ConvModule``). Compared with ``segtrain/models/cpnet.py``,
``segtrain/models/modules/context_prior.py`` and ``segtrain/losses/affinity.py``.

The reference model is the config's with ``depth=101`` (segtrain's ``resnet101_v1c``),
``pretrained=None``, plain ``BN`` for ``SyncBN`` (the same layer in eval mode on one
process) and ``prior_size`` = input / 8; segtrain's comes from ``conf/`` (``model=cpnet
dataset=cityscapes loss=affinity``, 19 classes as the reference config). The reference gets
random weights and BN statistics measured on a calibration batch (fixed seed); every
tensor is copied into segtrain's model by name (``key_mapping``), both run in eval mode on
one input, and the script prints the differences of the backbone features, the context
prior map, the logits and the loss terms.

Run it where mmcv 1.x (pure Python, no compiled ops needed) and mmsegmentation 0.x import,
e.g. a throwaway virtual environment beside segtrain's (``pip install mmcv==1.7.2
mmsegmentation==0.30.0``)::

    PYTHONPATH=. python scripts/reference/compare_cpnet.py --reference /path/to/ContextPrior

``--mmseg /path/to/mmsegmentation`` puts an mmsegmentation 0.x source tree first on the
path. ``torchvision`` (imported at the top of ``mmcv/runner/checkpoint.py``, used only to
load torchvision checkpoints) and the compiled ``mmcv.ops`` (none used by CPNet) are
replaced by empty stand-ins when they are missing. The reference loss moves a mask with
``.to(label.get_device())``, which fails on CPU tensors (-1); the script loads that file
with ``.to(label.device)`` instead, nothing else changed. Not imported by the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from common import REPO, n_params, segtrain_config
from torch import nn

BATCH = 2  # the reference's ideal affinity map squeezes a batch of one away (squeeze_())
NUM_CLASSES = 19
SEED = 0
DEVICE_FIX = (".to(label.get_device())", ".to(label.device)")


# ---- the reference -----------------------------------------------------------------------

def stub_missing_modules() -> list[str]:
    """Empty stand-ins for ``torchvision`` and ``mmcv.ops`` when they cannot be imported."""
    stubbed = []
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.models = types.ModuleType("torchvision.models")
        tv.models.__path__ = []
        sys.modules.update({"torchvision": tv, "torchvision.models": tv.models})
        stubbed.append("torchvision")
    if importlib.util.find_spec("mmcv._ext") is None:
        ops = types.ModuleType("mmcv.ops")
        ops.__path__ = []

        class Unavailable:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("mmcv.ops is a stand-in here: mmcv's compiled ops are "
                                   "not installed")

        def attribute(name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            return Unavailable

        ops.__getattr__ = attribute
        sys.modules["mmcv.ops"] = ops
        stubbed.append("mmcv.ops")
    return stubbed


def load_into_package(path: Path, module: str, replace: tuple[str, str] | None = None):
    """Execute ``path`` as ``module`` (so its relative imports resolve inside mmseg)."""
    if not path.is_file():
        raise SystemExit(f"reference file not found: {path}")
    source = path.read_text()
    if replace is not None:
        if source.count(replace[0]) != 1:
            raise SystemExit(f"{path}: expected one {replace[0]!r} to replace")
        source = source.replace(*replace)
    spec = importlib.util.spec_from_loader(module, loader=None, origin=str(path))
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(path)
    sys.modules[module] = mod
    exec(compile(source, str(path), "exec"), mod.__dict__)
    return mod


def register_reference(reference: Path):
    """Register the authors' ``AffinityLoss`` and ``CPHead`` in mmsegmentation."""
    load_into_package(reference / "loss" / "affinity_loss.py",
                      "mmseg.models.losses.affinity_loss", DEVICE_FIX)
    return load_into_package(reference / "decode_head" / "cp_head.py",
                             "mmseg.models.decode_heads.cp_head")


def reference_config(reference: Path, prior_size: int):
    """``config/cpnet_r50-d8.py`` at depth 101, no checkpoint, BN, the given prior size;
    ``drop_out_ratio`` (mmsegmentation's name when the config was written) is passed as
    ``dropout_ratio``, its later name."""
    from mmcv import Config

    cfg = Config.fromfile(str(reference / "config" / "cpnet_r50-d8.py"))
    model = cfg.model
    model.pretrained = None
    model.backbone.depth = 101
    for part in (model.backbone, model.decode_head, model.auxiliary_head):
        part.norm_cfg = dict(type="BN", requires_grad=True)
    for head in (model.decode_head, model.auxiliary_head):  # early mmseg's name, renamed
        head.dropout_ratio = head.pop("drop_out_ratio")
    model.decode_head.prior_size = prior_size
    model.train_cfg, model.test_cfg = cfg.train_cfg, cfg.test_cfg
    return model


def build_reference(reference: Path, prior_size: int) -> nn.Module:
    from mmseg.models import build_segmentor

    return build_segmentor(reference_config(reference, prior_size))


def randomise(model: nn.Module, calibration: torch.Tensor) -> None:
    """Random weights, biases and BN affines; BN statistics of one calibration batch."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                    * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
                module.reset_running_stats()
                module.momentum = None  # cumulative average: the batch's own statistics
        model.train()
        feats = model.extract_feat(calibration)
        model.decode_head(feats)
        model.auxiliary_head(feats)
    model.eval()


# ---- segtrain ----------------------------------------------------------------------------

def cpnet_config(prior_size: int):
    return segtrain_config(["model=cpnet", "dataset=cityscapes", "loss=affinity",
                            "model.pretrained=null",
                            f"model.prior_size=[{prior_size},{prior_size}]"])


def build_segtrain(prior_size: int):
    from hydra.utils import instantiate

    from segtrain.app import build_model

    cfg = cpnet_config(prior_size)
    return build_model(cfg), instantiate(cfg.loss)


# ---- copying the weights -----------------------------------------------------------------

STEM = {"stem.0": "conv1.0", "stem.1": "conv1.1", "stem.3": "conv1.3", "stem.4": "conv1.4",
        "stem.6": "conv1.6", "stem.7": "bn1"}
HEAD = {
    "decode_head.aggregation.reduce_conv.conv": "context_prior.aggregation.reduce.0",
    "decode_head.aggregation.reduce_conv.bn": "context_prior.aggregation.reduce.1",
    "decode_head.aggregation.t1.conv": "context_prior.aggregation.branch_a.0",
    "decode_head.aggregation.t2.conv": "context_prior.aggregation.branch_a.1",
    "decode_head.aggregation.p1.conv": "context_prior.aggregation.branch_b.0",
    "decode_head.aggregation.p2.conv": "context_prior.aggregation.branch_b.1",
    "decode_head.aggregation.norm": "context_prior.aggregation.bn",
    "decode_head.prior_conv.conv": "context_prior.prior_conv.0",
    "decode_head.prior_conv.bn": "context_prior.prior_conv.1",
    "decode_head.intra_conv.conv": "context_prior.intra_conv.0",
    "decode_head.intra_conv.bn": "context_prior.intra_conv.1",
    "decode_head.inter_conv.conv": "context_prior.inter_conv.0",
    "decode_head.inter_conv.bn": "context_prior.inter_conv.1",
    "decode_head.bottleneck.conv": "head.0.0",
    "decode_head.bottleneck.bn": "head.0.1",
    "decode_head.conv_seg": "head.2",
    "auxiliary_head.convs.0.conv": "aux_head.0.0",
    "auxiliary_head.convs.0.bn": "aux_head.0.1",
    "auxiliary_head.conv_seg": "aux_head.2",
}


def key_mapping(reference_key: str) -> str | None:
    """segtrain's name of a reference tensor, ``None`` if it has none."""
    module, _, leaf = reference_key.rpartition(".")
    if module.startswith("backbone."):
        inner = module[len("backbone."):]
        for old, new in STEM.items():
            if inner == old:
                return f"backbone.{new}.{leaf}"
        return reference_key if inner.startswith("layer") else None
    return f"{HEAD[module]}.{leaf}" if module in HEAD else None


def copy_weights(reference: nn.Module, model: nn.Module) -> tuple[int, list[str], list[str]]:
    """Copy every reference tensor into ``model``; (copied, unmapped reference keys, segtrain
    keys left unset)."""
    source = reference.state_dict()
    target = model.state_dict()
    copied, unmapped, filled = 0, [], set()
    for key, value in source.items():
        name = key_mapping(key)
        if name is None or name not in target:
            unmapped.append(key if name is None else f"{key} -> {name} (absent)")
            continue
        if target[name].shape != value.shape:
            raise SystemExit(f"shape of {key} {tuple(value.shape)} != {name} "
                             f"{tuple(target[name].shape)}")
        target[name] = value.clone()
        filled.add(name)
        copied += 1
    model.load_state_dict(target)
    return copied, unmapped, sorted(set(target) - filled)


# ---- running both ------------------------------------------------------------------------

def diff(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Print and return the max relative difference (max abs / max abs of the reference)."""
    if ours.shape != theirs.shape:
        raise SystemExit(f"{name}: shape {tuple(ours.shape)} != reference {tuple(theirs.shape)}")
    abs_diff = (ours.double() - theirs.double()).abs().max().item()
    scale = theirs.double().abs().max().item()
    rel = abs_diff / max(scale, 1e-30)
    print(f"  {name:<34} max|ref| {scale:11.5g}   max abs diff {abs_diff:10.3g}   "
          f"rel {rel:10.3g}")
    return rel


def frozen_train_mode(model: nn.Module) -> nn.Module:
    """Training-mode forward (all outputs) with BN statistics and dropout as in eval."""
    model.train()
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout2d, nn.Dropout)):
            module.eval()
    return model


def compare_features(reference: nn.Module, model: nn.Module, image: torch.Tensor) -> None:
    print("features (eval mode):")
    with torch.no_grad():
        theirs = reference.extract_feat(image)
        ours = model.backbone.forward_features(image)
        for name, their in zip(("c2", "c3", "c4", "c5"), theirs):
            diff(f"backbone {name} (layer{int(name[1:]) - 1})", ours[name], their)
        diff("aggregation module", model.context_prior.aggregation(ours["c5"]),
             reference.decode_head.aggregation(theirs[3]))
        their_logits, their_prior = reference.decode_head(theirs)
        _, our_prior = model.context_prior(ours["c5"])
        our_logits = model.head(model.context_prior(ours["c5"])[0])
        diff("context prior map P", our_prior, their_prior)
        diff("head logits at 1/8", our_logits, their_logits)
        diff("auxiliary logits at 1/8", model.aux_head(ours["c4"]),
             reference.auxiliary_head(theirs))
        diff("final logits (eval forward)", model(image)["out"],
             reference.encode_decode(image, [{}] * image.shape[0]))


def labels_with_pairs(gen: torch.Generator, size: int) -> torch.Tensor:
    """A label whose classes each cover at least two prior-grid cells (no lone position)."""
    n = (size // 8) ** 2
    rows = []
    for _ in range(BATCH):
        half = torch.randint(0, NUM_CLASSES, (n // 2,), generator=gen)
        classes = torch.cat([half, half, half[:n % 2]])  # an odd n: one class thrice
        rows.append(classes[torch.randperm(n, generator=gen)])
    grid = torch.stack(rows).view(BATCH, size // 8, size // 8)
    return grid.repeat_interleave(8, 1).repeat_interleave(8, 2)


def lone_rows(mask: torch.Tensor, grid: int) -> int:
    small = F.interpolate(mask[:, None].float(), size=(grid, grid), mode="nearest").long()
    flat = small.flatten(1)
    counts = (flat[:, :, None] == flat[:, None, :]).sum(-1)
    return int((counts == 1).sum())


def cross_entropy_term(terms: dict) -> torch.Tensor:
    """The CE of mmseg's ``losses()``: ``loss_seg`` in early versions, ``loss_ce`` later."""
    return terms["loss_ce"] if "loss_ce" in terms else terms["loss_seg"]


def reference_loss_terms(reference: nn.Module, image: torch.Tensor, mask: torch.Tensor):
    """The reference's own losses (CPHead.losses, FCNHead.losses) and its prior map."""
    head = reference.decode_head
    feats = reference.extract_feat(image)
    logits, prior = head(feats)
    prior.retain_grad()
    label = mask[:, None]
    terms = head.losses((logits, prior), label)
    aux = reference.auxiliary_head.losses(reference.auxiliary_head(feats), label)
    return {"ce": cross_entropy_term(terms), "aux": cross_entropy_term(aux) / 0.4,
            "prior": terms["loss_prior"]}, prior


def compare_loss(reference: nn.Module, model: nn.Module, criterion: nn.Module,
                 image: torch.Tensor, mask: torch.Tensor, title: str) -> None:
    from segtrain.losses.affinity import affinity_terms, ideal_affinity

    grid = mask.shape[-1] // 8
    lone = lone_rows(mask, grid)
    print(f"loss, {title} ({lone} of {BATCH * grid * grid} rows alone in their class, "
          f"{int((mask == 255).sum())} ignored pixels):")
    theirs, their_prior = reference_loss_terms(frozen_train_mode(reference), image, mask)
    outputs = frozen_train_mode(model)(image)
    outputs["prior"].retain_grad()
    ours = criterion(outputs, {"mask": mask})
    diff("CE (main)", ours["ce"], theirs["ce"])
    if (mask == 255).any():  # mmseg 0.x's CE means over every pixel, the ignored ones too
        kept = (mask != 255).float().mean()
        diff("  ... x non-ignored / all pixels", ours["ce"] * kept, theirs["ce"])
    diff("CE (auxiliary, before x0.4)", ours["aux"], theirs["aux"])
    our_prior_loss = ours["unary"] + ours["global"]
    diff("affinity loss (unary + global)", our_prior_loss, theirs["prior"])
    mean_constant = 200.0 * lone / (BATCH * grid * grid)
    diff("  ... + 200 x lone rows / rows", our_prior_loss + mean_constant, theirs["prior"])
    our_prior_loss.backward()
    theirs["prior"].backward()
    diff("d affinity loss / d P", outputs["prior"].grad, their_prior.grad)
    if (mask == 255).any():  # the reference's ideal map: 255 is one more class
        prior = outputs["prior"].detach().requires_grad_()
        affinity, valid = ideal_affinity(mask, (grid, grid), ignore_index=-1)
        as_class = sum(affinity_terms(prior, affinity, valid))
        diff("  ... 255 as a class (+ lone rows)", as_class + mean_constant, theirs["prior"])
        as_class.backward()
        diff("  ... its d loss / d P", prior.grad, their_prior.grad)
    reference.eval()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="a checkout of yu-changqian/ContextPrior")
    parser.add_argument("--mmseg", type=Path, default=None,
                        help="an mmsegmentation 0.x source tree (default: the installed one)")
    parser.add_argument("--size", type=int, default=64,
                        help="input height and width, a multiple of 8 (prior = size / 8)")
    args = parser.parse_args()
    if args.size % 8 or args.size < 16:
        raise SystemExit(f"--size must be a multiple of 8 and at least 16, got {args.size}")
    size = args.size
    torch.set_num_threads(1)
    if args.mmseg is not None:
        sys.path.insert(0, str(args.mmseg))
    sys.path.insert(0, str(REPO))
    print("stand-ins:", stub_missing_modules() or "none")
    import mmcv
    import mmseg

    print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmseg {mmseg.__version__}")
    register_reference(args.reference)

    grid = size // 8
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    calibration = torch.randn(4, 3, size, size, generator=gen)
    image = torch.randn(BATCH, 3, size, size, generator=gen)

    reference = build_reference(args.reference, grid)
    model, criterion = build_segtrain(grid)
    print(f"parameters (prior {grid}x{grid}, {NUM_CLASSES} classes): reference "
          f"{n_params(reference):,}, segtrain {n_params(model):,}")
    print(f"parameters (prior 64x64): reference {n_params(build_reference(args.reference, 64)):,},"
          f" segtrain {n_params(build_segtrain(64)[0]):,}")

    randomise(reference, calibration)
    copied, unmapped, unset = copy_weights(reference, model)
    print(f"tensors copied: {copied} of {len(reference.state_dict())}; unmapped reference "
          f"tensors: {unmapped or 'none'}; segtrain tensors not set: {unset or 'none'}")
    model.eval()
    print(f"input {BATCH}x3x{size}x{size}, prior {grid}x{grid}, float32, CPU")

    compare_features(reference, model, image)
    compare_loss(reference, model, criterion, image, labels_with_pairs(gen, size),
                 "every class on >= 2 grid cells")
    random_mask = torch.randint(0, NUM_CLASSES, (BATCH, size, size), generator=gen)
    compare_loss(reference, model, criterion, image, random_mask, "uniform random label")
    ignored = random_mask.clone()
    ignored[:, :size // 4] = 255
    compare_loss(reference, model, criterion, image, ignored,
                 "random label, top quarter 255")


if __name__ == "__main__":
    main()
