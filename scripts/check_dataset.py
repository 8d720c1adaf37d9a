"""Read every file of every split of a dataset once and list all problems before a long run.

    python scripts/check_dataset.py dataset=camvid dataset.root=/data/CamVid
    python scripts/check_dataset.py dataset=voc dataset.root=/data/VOCdevkit --workers 8
    python scripts/check_dataset.py dataset=ade20k dataset.root=/data/ADEChallengeData2016
    python scripts/check_dataset.py dataset=pascal_context dataset.root=/data/VOCdevkit/VOC2010

Checks the splits of the config (``dataset.train``, ``dataset.val``) and the dataset's test
split when it has one on disk. Each sample goes through the dataset class's own reading and
checks (``SegmentationDataset.__getitem__`` without augmentation): the image and the label
decode, the label values map into 0..num_classes-1 or the ignore index, image and label
sizes match; a split whose size differs from the official release (the module's
``SPLIT_SIZES``) is a problem too. Samples are read in parallel (a DataLoader with
``--workers`` processes, all cores by default). Prints the problems grouped by kind, with
counts and the files; exit status 1 if there is any.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

import numpy as np
from hydra.utils import get_class
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from segtrain.app import dataset_config, instantiate
from segtrain.data.base import DatasetError
from segtrain.errors import UserError

# the kind of a problem, from the message the dataset classes raise (segtrain/data/base.py)
KINDS = (
    ("missing file", re.compile(r"not found")),
    ("unreadable file", re.compile(r"cannot read")),
    ("label value out of range", re.compile(r"outside 0\.\.|are not labels of this dataset")),
    ("image/label size mismatch", re.compile(r"but its label")),
    ("bad label format", re.compile(r"expected a single-channel")),
)


def kind_of(message: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(message)), "other")


def as_float(image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """No augmentation; float32 as the dataset contract wants at the end of a pipeline."""
    return {"image": image.astype(np.float32), "mask": mask}


class Checked(Dataset):
    """Item ``i``: None when sample ``i`` reads and passes the dataset's checks, else the
    message of the DatasetError it raised."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str | None:
        try:
            self.dataset[index]
        except DatasetError as err:
            return str(err)
        return None


def splits(cfg: DictConfig) -> list[tuple[str, DictConfig, bool]]:
    """(label, dataset node, required) for the config's splits and the test split, if the
    dataset class has one that the config does not already name."""
    out = [(f"{name} ({cfg[name].get('split', name)})", cfg[name], True)
           for name in ("train", "val") if cfg.get(name) is not None]
    named = {str(node.get("split")) for _, node, _ in out}
    known = getattr(sys.modules.get(get_class(cfg.val._target_).__module__), "SPLITS", ())
    if "test" in known and "test" not in named:
        test = cfg.val.copy()
        test.split = "test"
        out.append(("test", test, False))
    return out


def official_size(node: DictConfig) -> int | None:
    """The split's size in the official release (the module's ``SPLIT_SIZES``), if known."""
    module = sys.modules.get(get_class(node._target_).__module__)
    return getattr(module, "SPLIT_SIZES", {}).get(str(node.get("split")))


def check(cfg: DictConfig, workers: int) -> dict[str, list[str]]:
    """Every problem, by kind."""
    problems: dict[str, list[str]] = defaultdict(list)
    for label, node, required in splits(cfg):
        try:
            dataset = instantiate(node, transforms=as_float)
        except DatasetError as err:
            if required:
                problems[kind_of(str(err))].append(str(err))
                print(f"{cfg.name} {label}: cannot open the split")
            else:
                print(f"{cfg.name} {label}: not on disk, skipped ({str(err).split('. ')[0]})")
            continue
        tic = time.perf_counter()
        loader = DataLoader(Checked(dataset), batch_size=None, num_workers=workers)
        found = [message for message in loader if message is not None]
        for message in found:
            problems[kind_of(message)].append(message)
        print(f"{cfg.name} {label}: {len(dataset)} samples read in "
              f"{time.perf_counter() - tic:.1f} s, {len(found)} problem(s)")
        expected = official_size(node)
        if expected is not None and len(dataset) != expected:
            problems["split size differs from the release"].append(
                f"{cfg.name} {label}: {len(dataset)} samples, the official release has "
                f"{expected}: an incomplete download or a modified split list")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dataset=<name> dataset.root=<path> ...")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="reading processes (default: all cores)")
    args = parser.parse_args(argv)
    cfg = dataset_config(args.overrides)
    try:
        problems = check(cfg, args.workers)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    total = sum(len(v) for v in problems.values())
    if not total:
        print(f"{cfg.name}: no problems")
        return 0
    print(f"{cfg.name}: {total} problem(s)")
    for kind, messages in sorted(problems.items(), key=lambda kv: -len(kv[1])):
        print(f"  {kind}: {len(messages)}")
        for message in messages:
            print(f"    {message}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
