"""Convert the PASCAL-Context annotations once into label PNGs (``dataset=pascal_context``).

    python scripts/prepare_pascal_context.py --voc /data/VOCdevkit/VOC2010 --context /data/context

Reads the annotations in the form the authors distribute them
(https://cs.stanford.edu/~roozbeh/pascal-context/), not the Detail API's JSON:

- ``<context>/trainval/<id>.mat``: ``LabelMap``, an HxW map of indices into ``labels.txt``
  (from ``trainval.tar.gz``; 10,103 files, one per VOC 2010 train/val image);
- ``<context>/labels.txt``: the 459 classes, ``"<index>: <name>"`` per line;
- ``<context>/59_labels.txt``: the 59-class benchmark subset, same format. It spells three
  names differently from labels.txt (``diningtable``, ``bedcloth``, ``clothes`` for
  ``table``, ``bedclothes``, ``cloth``), which are matched as FCN's reference data layer
  (fcn.berkeleyvision.org, ``pascalcontext_layers.py``) matches them.

and writes ``<voc>/SegmentationClassContext/<id>.png`` for every id of VOC 2010's
``ImageSets/Main/{train,val}.txt`` (4,998 + 5,105): single-channel PNGs with 0 = background
(unlabelled and the 400 other classes) and 1..59 = ``segtrain.data.pascal_context``'s
``CLASS_NAMES_59`` in order; the 59- and 60-class variants both read these files.

The conversion runs once: a PNG already written under the same label mapping (recorded in
``SegmentationClassContext/.mapping``) is kept; ``--overwrite`` redoes all, and a changed
``labels.txt``/``59_labels.txt`` redoes all by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from segtrain.data.pascal_context import CLASS_NAMES_59, LABEL_DIR, SPLIT_SIZES

# 59_labels.txt name -> labels.txt name (FCN's pascalcontext_layers.py)
ALIASES = {"diningtable": "table", "bedcloth": "bedclothes", "clothes": "cloth"}
LINE = re.compile(r"^\s*(\d+)\s*:\s*(.+?)\s*$")
STAMP = ".mapping"


class PrepareError(RuntimeError):
    pass


def _key(name: str) -> str:
    """Names compare without spaces, as FCN's layer compares them."""
    return name.replace(" ", "").lower()


def read_label_list(path: Path) -> dict[int, str]:
    """``"<index>: <name>"`` lines -> {index: name}; anything else is an error."""
    if not path.is_file():
        raise PrepareError(f"label list not found: {path} (from "
                           f"https://cs.stanford.edu/~roozbeh/pascal-context/)")
    out: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = LINE.match(line)
        if match is None:
            raise PrepareError(f"{path}:{number}: expected '<index>: <name>', got {line!r}")
        out[int(match.group(1))] = match.group(2)
    if not out:
        raise PrepareError(f"{path} lists no classes")
    return out


def label_mapping(labels_txt: Path, labels_59_txt: Path) -> np.ndarray:
    """A lookup table: labels.txt index -> 0 (background) or 1..59 (CLASS_NAMES_59 order)."""
    full = read_label_list(labels_txt)
    subset = read_label_list(labels_59_txt)
    index_of = {_key(name): index for index, name in full.items()}
    names = {_key(ALIASES.get(_key(n), n)) for n in subset.values()}
    ours = {_key(n) for n in CLASS_NAMES_59}
    if names != ours:
        raise PrepareError(f"{labels_59_txt}: its classes differ from the 59 of the benchmark: "
                           f"unexpected {sorted(names - ours)}, missing {sorted(ours - names)}")
    absent = sorted(n for n in ours if n not in index_of)
    if absent:
        raise PrepareError(f"{labels_txt}: class(es) {absent} of 59_labels.txt not found (is "
                           f"this the 459-class labels.txt of trainval.tar.gz?)")
    lut = np.zeros(max(full) + 1, np.uint8)
    for train_id, name in enumerate(CLASS_NAMES_59, 1):
        lut[index_of[_key(name)]] = train_id
    return lut


def read_label_map(path: Path) -> np.ndarray:
    """The ``LabelMap`` of one ``trainval/<id>.mat``."""
    try:
        label = np.asarray(scipy.io.loadmat(str(path))["LabelMap"])
    except FileNotFoundError as err:
        raise PrepareError(f"annotation not found: {path}") from err
    except KeyError as err:
        raise PrepareError(f"{path}: no variable 'LabelMap' (expected the trainval/*.mat files "
                           f"of PASCAL-Context's trainval.tar.gz)") from err
    except (ValueError, OSError, TypeError) as err:
        raise PrepareError(f"cannot read {path}: {err}") from err
    if label.ndim != 2:
        raise PrepareError(f"{path}: LabelMap has shape {label.shape}, expected HxW")
    return label


_LUT: np.ndarray | None = None


def _init(lut: np.ndarray) -> None:
    global _LUT
    _LUT = lut


def _convert(job: tuple[str, str, str, bool]) -> bool:
    """Write one label PNG; False when an existing one was kept."""
    mat, image, dst, overwrite = job
    dst_path = Path(dst)
    if dst_path.exists() and not overwrite:
        return False
    label = read_label_map(Path(mat))
    bad = np.unique(label[(label < 0) | (label >= len(_LUT))])
    if bad.size:
        raise PrepareError(f"{mat}: LabelMap value(s) {bad.tolist()[:10]} are not indices of "
                           f"labels.txt (0..{len(_LUT) - 1})")
    with Image.open(image) as img:
        width, height = img.size
    if label.shape != (height, width):
        raise PrepareError(f"{mat}: LabelMap is {label.shape[1]}x{label.shape[0]} but its image "
                           f"{image} is {width}x{height} (width x height)")
    tmp = dst_path.with_name(f".{dst_path.name}.tmp")
    Image.fromarray(_LUT[label]).save(tmp, format="PNG")
    os.replace(tmp, dst_path)
    return True


def find_context_files(context: Path) -> tuple[Path, Path, Path]:
    """(trainval folder, labels.txt, 59_labels.txt); the lists may sit in trainval/ too."""
    trainval = context / "trainval"
    if not trainval.is_dir():
        raise PrepareError(f"no trainval/ folder in {context}: expected the extracted "
                           f"trainval.tar.gz of https://cs.stanford.edu/~roozbeh/pascal-context/ "
                           f"(trainval/<id>.mat)")
    found = []
    for name in ("labels.txt", "59_labels.txt"):
        where = [p for p in (context / name, trainval / name) if p.is_file()]
        if not where:
            raise PrepareError(f"{name} not found in {context} or {trainval} (download it from "
                               f"https://cs.stanford.edu/~roozbeh/pascal-context/)")
        found.append(where[0])
    return trainval, found[0], found[1]


def prepare(voc: Path, context: Path, workers: int = 1,
            overwrite: bool = False) -> dict[str, list[str]]:
    """Write the label PNGs; returns the ids of each split."""
    if not (voc / "JPEGImages").is_dir():
        raise PrepareError(f"{voc} is not VOC 2010: no JPEGImages folder (pass "
                           f"--voc <path>/VOCdevkit/VOC2010 from VOCtrainval_03-May-2010.tar)")
    trainval, labels_txt, labels_59_txt = find_context_files(context)
    lut = label_mapping(labels_txt, labels_59_txt)
    ids = {}
    for split in SPLIT_SIZES:
        list_file = voc / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise PrepareError(f"split list not found: {list_file}")
        ids[split] = [line.split()[0] for line in list_file.read_text().splitlines()
                      if line.strip()]
    every = sorted({i for split_ids in ids.values() for i in split_ids})
    for folder, suffix, what in ((trainval, ".mat", "PASCAL-Context annotation(s)"),
                                 (voc / "JPEGImages", ".jpg", "VOC 2010 image(s)")):
        missing = [i for i in every if not (folder / f"{i}{suffix}").is_file()]
        if missing:
            raise PrepareError(f"{len(missing)} of {len(every)} {what} missing from {folder} "
                               f"(e.g. {missing[0]}{suffix}): the download is incomplete")
    out_dir = voc / LABEL_DIR
    out_dir.mkdir(exist_ok=True)
    digest = hashlib.sha1(lut.tobytes()).hexdigest()
    stamp = out_dir / STAMP
    if stamp.is_file() and stamp.read_text().strip() != digest and not overwrite:
        print(f"note: {labels_txt} / {labels_59_txt} map classes differently from the PNGs in "
              f"{out_dir}; converting everything again", file=sys.stderr)
        overwrite = True
    jobs = [(str(trainval / f"{i}.mat"), str(voc / "JPEGImages" / f"{i}.jpg"),
             str(out_dir / f"{i}.png"), overwrite) for i in every]
    if workers > 1:
        with Pool(workers, initializer=_init, initargs=(lut,)) as pool:
            written = pool.map(_convert, jobs, chunksize=64)
    else:
        _init(lut)
        written = [_convert(j) for j in jobs]
    stamp.write_text(digest + "\n")
    print(f"wrote {sum(written)} label PNGs to {out_dir} (kept {len(written) - sum(written)} "
          f"already there); " + ", ".join(f"{s} {len(v)}" for s, v in ids.items()))
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voc", type=Path, required=True, help="VOCdevkit/VOC2010")
    parser.add_argument("--context", type=Path, required=True,
                        help="folder holding trainval/, labels.txt and 59_labels.txt")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        ids = prepare(args.voc, args.context, args.workers, args.overwrite)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, expected in SPLIT_SIZES.items():
        if len(ids[split]) != expected:
            print(f"note: {split} has {len(ids[split])} images, not the {expected} of the "
                  f"official VOC 2010 ImageSets/Main/{split}.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
