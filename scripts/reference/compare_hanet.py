"""Compare segtrain's HANet with the authors' code, the reference's weights copied across.

    python scripts/reference/compare_hanet.py --reference /path/to/HANet
    python scripts/reference/compare_hanet.py --reference /path/to/HANet model.pe_offset=0

Reference: shachoi/HANet (Choi et al., CVPR 2020), the model of
``scripts/train_r101_os8_hanet.sh``: ``network/deepv3.py`` ``DeepR101V3PlusD_HANet_OS8``
(``DeepV3PlusHANet``, ASPP ``_AtrousSpatialPyramidPoolingModule``), ``network/HANet.py``
``HANet_Conv``, ``network/PosEmbedding.py`` ``PosEncoding1D``, ``network/Resnet.py``
``ResNet3X3`` and ``network/mynn.py``. segtrain's model is composed as training does it
(``experiment=hanet_cityscapes model.pretrained=null``, ``segtrain.app.build_model``; more
Hydra overrides may follow, e.g. ``model.pe_offset=0``, the paper's encoding).

The reference is built on the CPU without touching its files: ``torchvision`` (imported by
``deepv3.py``, unused for ResNet-101) is stubbed, ``Tensor.cuda`` returns the tensor
(``PosEncoding1D`` calls it), ``Resnet.resnet101`` is called with ``pretrained=False``
(no ImageNet file) and ``cfg.MODEL.BNFUNC`` is ``nn.SyncBatchNorm`` (``--syncbn``; without
a process group it is plain batch norm, and it accepts HANet's 3-D maps). Its weights are
random (fixed seed): biases and BN affine parameters drawn at random, BN running
statistics measured on random batches. Every tensor is then copied into segtrain's model:

- concatenation orders differ (ASPP: image pooling first there, last here; decoder: the
  48 low-level channels first there, last here): the input channels of the next
  convolutions (and the output channels of the layer2 attention) are permuted;
- the two convolutions with a bias before BN there (HANet's second conv, the aux head's
  3x3) have none here: the bias is folded into the BN's running mean (exact in eval mode;
  in training mode the batch mean cancels it on both sides);
- the positional-encoding table (a frozen ``nn.Embedding``, 17 rows) is not copied: the
  ``pe`` buffer (17 rows too) is computed from the same formula, and the script prints how
  far it is from the table.

The reference indexes the encoding by the row in the full image (``pos``); it is given the
rows of an image that is the whole input (``pos_h = row * 1024 / H // 8``), which are
segtrain's without ``rows`` (the input's own) and both at whole-image evaluation; then, in
eval mode, the rows of a training crop (frame rows 256 + 8 r: rows 256-767 at scale 1/8),
as ``pos_h = row // 8`` there and ``rows = row / 1024`` here. Both run in eval mode, then
in training mode with every dropout at 0 and ``pos_noise`` 0 (``model.pos_noise=0`` here;
batch 2, batch statistics), and the script prints the largest absolute and relative
differences of the logits and of intermediate features.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
from pathlib import Path

import torch
from common import REPO, n_params, record_outputs, segtrain_config
from torch import nn

sys.path.insert(0, str(REPO))

from segtrain.app import build_model  # noqa: E402

NUM_CLASSES = 19
FULL_IMAGE_ROWS = 1024  # the reference's pos_h: rows of a 1024-row Cityscapes image, // 8
# scripts/train_r101_os8_hanet.sh (model flags), train.py defaults for the others
REFERENCE_ARGS = dict(hanet=[1, 1, 1, 1, 0], hanet_set=[3, 64, 3], hanet_pos=[2, 1],
                      pos_rfactor=8, pooling="mean", dropout=0.1, pos_noise=0.5,
                      aux_loss=True)

# reference state-dict key -> segtrain key (first match wins)
KEY_RULES = [
    (r"^layer0\.([0-6])\.", r"backbone.conv1.\1."),  # deep stem convs 0/3/6, BN 1/4
    (r"^layer0\.7\.", "backbone.bn1."),
    (r"^layer([1-4])\.", r"backbone.layer\1."),
    (r"^aspp\.features\.(\d)\.", r"aspp.branches.\1."),
    (r"^aspp\.img_conv\.", "aspp.pooling.conv."),
    (r"^bot_aspp\.", "aspp.project.0."),
    (r"^bot_fine\.", "reduce."),
    (r"^final1\.([01])\.", r"decoder.0.\1."),
    (r"^final1\.3\.", "decoder.1.0."),
    (r"^final1\.4\.", "decoder.1.1."),
    (r"^final2\.0\.", "classifier."),
    (r"^dsn\.([01])\.", r"aux_head.0.\1."),
    (r"^dsn\.4\.", "aux_head.2."),
    (r"^hanet(\d)\.attention_first\.", lambda m: f"attention.layer{int(m[1]) + 1}.conv1."),
    (r"^hanet(\d)\.attention_second\.", lambda m: f"attention.layer{int(m[1]) + 1}.conv2."),
    (r"^hanet(\d)\.attention_third\.0\.", lambda m: f"attention.layer{int(m[1]) + 1}.conv3."),
    (r"^hanet(\d)\.pos_emb1d_2nd\.pos_layer\.weight$",
     lambda m: f"attention.layer{int(m[1]) + 1}.pe"),
]
# biases before a BN there (reference key -> the BN's running mean, segtrain key)
FOLDED_BIASES = {r"^hanet(\d)\.attention_second\.0\.bias$": r"attention.layer{}.conv2.1",
                 r"^dsn\.0\.bias$": "aux_head.0.1"}


# ---- the reference on the CPU ---------------------------------------------------------

def stub_reference_environment(reference: Path) -> None:
    """Make the reference importable on a CPU-only torch without torchvision."""
    if not (reference / "network" / "deepv3.py").is_file():
        raise SystemExit(f"--reference {reference}: no network/deepv3.py (a shachoi/HANet "
                         f"checkout is expected)")
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.ModuleType("torchvision.models")
    sys.modules.setdefault("torchvision", torchvision)
    sys.modules.setdefault("torchvision.models", torchvision.models)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(reference))
    from config import cfg

    cfg.MODEL.BNFUNC = nn.SyncBatchNorm  # --syncbn; plain BN without a process group


def build_reference(seed: int) -> nn.Module:
    """``DeepR101V3PlusD_HANet_OS8`` with the train script's flags, random weights."""
    import functools

    from network import Resnet, deepv3

    Resnet.resnet101 = functools.partial(Resnet.resnet101, pretrained=False)
    torch.manual_seed(seed)
    identity_loss = lambda outputs, labels: outputs  # noqa: E731 (train mode returns logits)
    model = deepv3.DeepR101V3PlusD_HANet_OS8(argparse.Namespace(**REFERENCE_ARGS),
                                             NUM_CLASSES, identity_loss, identity_loss)
    for module in model.modules():
        # training-mode jitter of the rows: its torch.clamp(long, min=0.0) gives float
        # indices on torch 2 (the code was written for torch 1.x), so it is switched off
        if hasattr(module, "pos_noise"):
            module.pos_noise = 0.0
    return model


def whole_frame_rows(height: int) -> torch.Tensor:
    """Rows of the 1024-row frame that an input of ``height`` rows, the whole image, shows."""
    return torch.arange(height) * FULL_IMAGE_ROWS // height


def reference_positions(batch: int, frame_rows: torch.Tensor,
                        width: int) -> tuple[torch.Tensor, ...]:
    """``pos`` of an input whose rows show ``frame_rows``: row // 8, as the datasets."""
    pos_h = (frame_rows // 8)[None, :, None].expand(batch, len(frame_rows), width).contiguous()
    return pos_h, torch.zeros_like(pos_h)


def segtrain_rows(batch: int, frame_rows: torch.Tensor, width: int) -> torch.Tensor:
    """segtrain's ``rows`` of the same input: frame row / 1024 (``dataset.source_rows``)."""
    rows = frame_rows.float() / FULL_IMAGE_ROWS
    return rows[None, :, None].expand(batch, len(frame_rows), width).contiguous()


def run_reference(model: nn.Module, image: torch.Tensor,
                  frame_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if frame_rows is None:
        frame_rows = whole_frame_rows(image.shape[-2])
    pos = reference_positions(image.shape[0], frame_rows, image.shape[-1])
    if not model.training:
        return {"out": model(image, pos=pos)}
    labels = torch.zeros(image.shape[0], *image.shape[-2:], dtype=torch.long)
    out, aux = model(image, gts=labels, aux_gts=labels, pos=pos)
    return {"out": out, "aux": aux}


@torch.no_grad()
def randomise_reference(model: nn.Module, image_size: tuple[int, int], seed: int) -> None:
    """Random biases and BN affine parameters; running statistics of two random batches."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0.0, 0.1)
            module.momentum = None  # cumulative average over the batches below
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.bias is not None:
            module.bias.normal_(0.0, 0.1)
    model.train()
    for _ in range(2):
        run_reference(model, torch.randn(2, 3, *image_size))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
    model.eval()


# ---- segtrain's model and the weight mapping ----------------------------------------------

def build_segtrain(overrides: list[str]) -> nn.Module:
    return build_model(segtrain_config(
        ["experiment=hanet_cityscapes", "model.pretrained=null",
         "model.pos_noise=0",  # as the reference's, switched off
         f"dataset.num_classes={NUM_CLASSES}", *overrides]))


def segtrain_key(reference_key: str) -> str | None:
    for pattern, replacement in KEY_RULES:
        if re.search(pattern, reference_key):
            return re.sub(pattern, replacement, reference_key)
    return None


def concat_permutations(model: nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """segtrain key -> (dim, index): our channel j is the reference's channel index[j]."""
    width = model.aspp.project[0][0].in_channels  # 5 x 256: branches here, pooling last
    pooled = model.aspp.pooling.conv[0].out_channels
    aspp = torch.cat([torch.arange(pooled, width), torch.arange(pooled)])
    low = model.reduce[0].out_channels  # 48 low-level channels: last here, first there
    decoder_in = model.decoder[0][0].in_channels
    decoder = torch.cat([torch.arange(low, decoder_in), torch.arange(low)])
    return {"aspp.project.0.0.weight": (1, aspp),
            "attention.layer2.conv3.weight": (0, aspp),
            "attention.layer2.conv3.bias": (0, aspp),
            "attention.layer3.conv1.0.weight": (1, aspp),
            "decoder.0.0.weight": (1, decoder),
            "attention.layer4.conv1.0.weight": (1, decoder)}


def folded_bias_target(reference_key: str) -> str | None:
    """The segtrain BN whose running mean absorbs this reference bias, if it is one."""
    for pattern, bn in FOLDED_BIASES.items():
        match = re.search(pattern, reference_key)
        if match:
            return bn.format(*(int(g) + 1 for g in match.groups())) + ".running_mean"
    return None


@torch.no_grad()
def copy_reference_weights(reference: nn.Module, model: nn.Module) -> dict[str, list[str]]:
    """Copy every reference tensor into ``model``; returns what was copied, folded,
    compared (the encoding tables) and left unmapped."""
    ours = model.state_dict()
    buffers = dict(model.named_buffers())
    permutations = concat_permutations(model)
    report = {"mapped": [], "folded": [], "unmapped_reference": [], "pe_max_diff": []}
    folded = {}
    for key, value in reference.state_dict().items():
        target = folded_bias_target(key)
        if target is not None:
            folded[target] = value
            report["folded"].append(f"{key} -> {target}")
            continue
        name = segtrain_key(key)
        if name is None or (name not in ours and name not in buffers):
            report["unmapped_reference"].append(key)
            continue
        if name.endswith(".pe"):  # (17, C) embedding; ours (C, 17), computed, not copied
            table = value[:buffers[name].shape[1]].t()
            report["pe_max_diff"].append(f"{name}: {(table - buffers[name]).abs().max():.3g}")
        else:
            if name in permutations:
                dim, index = permutations[name]
                value = value.index_select(dim, index)
            ours[name].copy_(value)
            report["mapped"].append(name)
    for target, bias in folded.items():
        ours[target] -= bias  # BN(conv(x) + b) with mean m == BN(conv(x)) with mean m - b
    report["unmapped_segtrain"] = sorted(set(ours) - set(report["mapped"]))
    return report


# ---- running both and comparing ----------------------------------------------------------

FEATURE_PAIRS = [  # (reference module, segtrain module, channel permutation or None)
    ("layer1", "backbone.layer1", None), ("layer3", "backbone.layer3", None),
    ("layer4", "backbone.layer4", None), ("hanet0", "attention.layer1", None),
    ("hanet1", "attention.layer2", "aspp"), ("hanet2", "attention.layer3", None),
    ("final1", "decoder", None), ("hanet3", "attention.layer4", None),
    ("final2", "classifier", None),
]


def differences(ours: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (ours - ref).abs().max().item()
    return f"max abs diff {diff:.3g}, relative {diff / ref.abs().max().item():.3g} " \
           f"(max |ref| {ref.abs().max().item():.3g})"


@torch.no_grad()
def compare(reference: nn.Module, model: nn.Module, image: torch.Tensor, mode: str,
            frame_rows: torch.Tensor | None = None) -> None:
    """Logits and features of both; ``frame_rows``: the rows of the 1024-row frame the
    input shows (None: the whole frame, and segtrain is given no rows)."""
    aspp_index = concat_permutations(model)["aspp.project.0.0.weight"][1]
    ref_seen, ref_hooks = record_outputs(reference, [r for r, _, _ in FEATURE_PAIRS])
    our_seen, our_hooks = record_outputs(model, [o for _, o, _ in FEATURE_PAIRS])
    rows = None if frame_rows is None else segtrain_rows(image.shape[0], frame_rows,
                                                          image.shape[-1])
    ref_out = run_reference(reference, image, frame_rows)
    our_out = model(image) if rows is None else model(image, rows=rows)
    for hook in ref_hooks + our_hooks:
        hook.remove()
    for key in ref_out:
        print(f"[{mode}] logits {key} {tuple(our_out[key].shape)}: "
              f"{differences(our_out[key], ref_out[key])}")
    for ref_name, our_name, perm in FEATURE_PAIRS:
        ref = ref_seen[ref_name] if perm is None else ref_seen[ref_name][:, aspp_index]
        print(f"[{mode}]   {ref_name} / {our_name}: {differences(our_seen[our_name], ref)}")


def disable_dropout(*models: nn.Module) -> None:
    """Dropout p = 0 on both sides (HANet's, the aux head's)."""
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="a shachoi/HANet checkout")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of segtrain's model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = (args.height, args.width)

    stub_reference_environment(args.reference.resolve())
    reference = build_reference(args.seed)
    randomise_reference(reference, size, args.seed)
    model = build_segtrain(args.overrides).eval()
    print(f"parameters: reference {n_params(reference):,}, segtrain {n_params(model):,}")
    report = copy_reference_weights(reference, model)
    print(f"tensors: {len(report['mapped'])} copied, {len(report['folded'])} biases folded "
          f"into a BN running mean, {len(report['pe_max_diff'])} encoding tables compared, "
          f"{len(report['unmapped_reference'])} reference and "
          f"{len(report['unmapped_segtrain'])} segtrain tensors unmapped")
    for line in report["folded"]:
        print(f"  folded: {line}")
    for key in report["unmapped_reference"] + report["unmapped_segtrain"]:
        print(f"  unmapped: {key}")
    for line in report["pe_max_diff"]:
        print(f"  positional encoding, max |reference table - our buffer|: {line}")

    torch.manual_seed(args.seed + 1)
    image = torch.randn(1, 3, *size)
    compare(reference, model, image, "eval")
    # a training crop: frame rows 256-767 at scale 1/8 (rows 256, 264, ...), in the 1024-row
    # frame's coordinates on both sides (pos_h = row // 8 there, rows = row / 1024 here)
    crop_rows = 256 + 8 * torch.arange(size[0])
    compare(reference, model, image, "eval, crop of frame rows 256+8r", crop_rows)
    with torch.no_grad():  # segtrain before dataset.source_rows: the crop's own rows
        relative = differences(model(image)["out"],
                               run_reference(reference, image, crop_rows)["out"])
    print(f"[eval, crop of frame rows 256+8r] logits out without rows (the crop's own): "
          f"{relative}")
    disable_dropout(reference, model)
    reference.train()
    model.train()
    compare(reference, model, torch.randn(2, 3, *size), "train")


if __name__ == "__main__":
    main()
