"""Build VOC 2012's SBD-augmented training set (``dataset=voc dataset.split=train_aug``).

    python scripts/prepare_voc_aug.py --voc /data/VOCdevkit/VOC2012 --sbd /data/benchmark_RELEASE

Reads SBD (Hariharan et al., ICCV 2011: ``benchmark_RELEASE/dataset/cls/<id>.mat`` and its
``train.txt``/``val.txt``) and writes, inside the VOC folder:

- ``SegmentationClassAug/<id>.png``: single-channel PNGs with labels 0..20 (255 = border);
- ``ImageSets/Segmentation/train_aug.txt``: the ids of
  (SBD train + SBD val + VOC train) - VOC val, i.e. 10,582 images for the official sets,
  the training set of every DeepLab result (Chen et al., TPAMI 2017, Sec. 4.1).

An image annotated by VOC itself (in ``SegmentationClass``) keeps VOC's label, which is
finer and marks object borders as ignore; the others take SBD's ``GTcls.Segmentation``.
Images are never copied: all SBD images are already in VOC 2012's ``JPEGImages``.
Existing PNGs are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

EXPECTED_TRAIN_AUG = 10582


class PrepareError(RuntimeError):
    pass


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"list file not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def sbd_dataset_dir(sbd: Path) -> Path:
    """Accept benchmark_RELEASE, benchmark_RELEASE/dataset or the folder above."""
    for candidate in (sbd, sbd / "dataset", sbd / "benchmark_RELEASE" / "dataset"):
        if (candidate / "cls").is_dir():
            return candidate
    raise PrepareError(f"no SBD 'cls' folder under {sbd}: expected "
                       f"benchmark_RELEASE/dataset/cls/<id>.mat (from benchmark.tgz; "
                       f"python scripts/download_voc.py downloads it)")


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class segmentation of one SBD ``cls/*.mat`` file, checked to be 0..20."""
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except FileNotFoundError as err:
        raise PrepareError(f"SBD label file not found: {path}") from err
    except (KeyError, AttributeError) as err:
        raise PrepareError(f"{path}: expected a struct 'GTcls' with field 'Segmentation' "
                           f"(SBD cls format)") from err
    except (ValueError, OSError, TypeError) as err:
        raise PrepareError(f"cannot read SBD label file {path}: {err}") from err
    if seg.ndim != 2:
        raise PrepareError(f"{path}: GTcls.Segmentation has shape {seg.shape}, expected HxW")
    bad = np.unique(seg[(seg < 0) | (seg > 20)])
    if bad.size:
        raise PrepareError(f"{path}: label value(s) {bad.tolist()[:10]} outside 0..20")
    return seg.astype(np.uint8)


def read_voc_label(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        label = np.asarray(img)
    bad = np.unique(label[(label > 20) & (label != 255)])
    if bad.size:
        raise PrepareError(f"{path}: label value(s) {bad.tolist()[:10]} outside 0..20 and 255")
    return label.astype(np.uint8)


def _convert(job: tuple[str, str, str, bool]) -> str:
    """Write one SegmentationClassAug PNG; returns its source ('voc' or 'sbd')."""
    source, src, dst, overwrite = job
    dst_path = Path(dst)
    if dst_path.exists() and not overwrite:
        return source
    label = read_voc_label(Path(src)) if source == "voc" else read_sbd_mat(Path(src))
    tmp = dst_path.with_name(f".{dst_path.name}.tmp")
    Image.fromarray(label).save(tmp, format="PNG")
    os.replace(tmp, dst_path)
    return source


def prepare(voc: Path, sbd: Path, workers: int = 1, overwrite: bool = False) -> list[str]:
    """Write SegmentationClassAug and train_aug.txt; returns the train_aug ids."""
    if not (voc / "JPEGImages").is_dir():
        raise PrepareError(f"{voc} is not VOC 2012: no JPEGImages folder (pass "
                           f"--voc <path>/VOCdevkit/VOC2012)")
    sbd_dir = sbd_dataset_dir(sbd)
    voc_sets = voc / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_ids(voc_sets / "train.txt"), read_ids(voc_sets / "val.txt")
    sbd_ids = read_ids(sbd_dir / "train.txt") + read_ids(sbd_dir / "val.txt")
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - set(voc_val))
    missing = [i for i in train_aug if not (voc / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing:
        raise PrepareError(f"{len(missing)} train_aug image(s) missing from "
                           f"{voc / 'JPEGImages'}, e.g. {missing[:3]}")
    out_dir = voc / "SegmentationClassAug"
    out_dir.mkdir(exist_ok=True)
    jobs = []
    for i in train_aug:
        voc_label = voc / "SegmentationClass" / f"{i}.png"
        if voc_label.is_file():
            jobs.append(("voc", str(voc_label), str(out_dir / f"{i}.png"), overwrite))
        else:
            jobs.append(("sbd", str(sbd_dir / "cls" / f"{i}.mat"), str(out_dir / f"{i}.png"),
                         overwrite))
    if workers > 1:
        with Pool(workers) as pool:
            sources = pool.map(_convert, jobs, chunksize=64)
    else:
        sources = [_convert(j) for j in jobs]
    list_file = voc_sets / "train_aug.txt"
    list_file.write_text("".join(f"{i}\n" for i in train_aug))
    print(f"wrote {len(train_aug)} labels to {out_dir} ({sources.count('voc')} from VOC, "
          f"{sources.count('sbd')} from SBD) and the list {list_file}")
    return train_aug


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=Path, required=True, help="VOCdevkit/VOC2012")
    parser.add_argument("--sbd", type=Path, required=True, help="benchmark_RELEASE")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        ids = prepare(args.voc, args.sbd, args.workers, args.overwrite)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if len(ids) != EXPECTED_TRAIN_AUG:
        print(f"note: {len(ids)} images, not the {EXPECTED_TRAIN_AUG} of the official VOC 2012 "
              f"and SBD lists; check that both are complete", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
