"""Miniatures of each dataset's exact on-disk layout, built in a temporary folder.

Each ``make_*`` writes a few small files in the layout the real distribution uses (palette
PNGs for VOC, labelIds for Cityscapes, a COCO json with polygons and RLE, ...) and returns
what a test needs to check the loader against (expected masks, split sizes).

Raw labels follow ``block_labels``: a grid of constant blocks. Images are drawn from their
labels (``pattern_image``), so a test can recover the label from the image after any
augmentation and check that the two stayed aligned.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from segtrain.data.base import voc_colormap

BLOCK = 6  # pixels per label block


def block_labels(height: int, width: int, values: list[int], offset: int = 0,
                 block: int = BLOCK) -> np.ndarray:
    """A grid of ``block``-sized squares cycling through ``values`` (row-major)."""
    rows, cols = np.mgrid[0:height, 0:width]
    index = (rows // block) * ((width + block - 1) // block) + cols // block + offset
    return np.asarray(values, np.int64)[index % len(values)].astype(np.uint8)


def pattern_image(train_ids: np.ndarray, ignore_value: int = 255) -> np.ndarray:
    """Grey image of level ``5 * train_id + 20`` (``ignore`` pixels: 250).

    The label sits in the luminance, which JPEG keeps (it subsamples colour).
    """
    level = np.where(train_ids == ignore_value, 250, 5 * train_ids.astype(np.int64) + 20)
    return np.repeat(level[..., None], 3, axis=-1).astype(np.uint8)


def label_from_red(red: np.ndarray) -> np.ndarray:
    """Invert ``pattern_image`` from one channel: the train id (250 -> 255)."""
    ids = np.rint((red.astype(np.float64) - 20) / 5).astype(np.int64)
    return np.where(red > 237.5, 255, ids)


def save_png(path: Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette.astype(np.uint8).ravel().tolist())
    img.save(path)


def save_palette_png(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    """A 'P'-mode PNG holding raw palette indices, as VOC's SegmentationClass."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    full = np.zeros((256, 3), np.uint8)
    full[: len(palette)] = palette
    full[255] = (224, 224, 192)  # VOC's border colour
    img.putpalette(full.ravel().tolist())
    img.save(path)


def save_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


# --------------------------------------------------------------------------- CamVid


def make_camvid(root: Path, sizes: dict[str, int] | None = None, list_style: str = "relative",
                height: int = 36, width: int = 48, block: int = BLOCK
                ) -> dict[str, list[np.ndarray]]:
    """SegNet CamVid: ``train/``, ``trainannot/``, ... and list files.

    ``list_style``: "relative" (``train/x.png trainannot/x.png``), "segnet" (the release's
    absolute ``/SegNet/CamVid/train/x.png``) or "none" (no list files). Raw labels cycle
    through 0..11 (11 = void). Returns the raw labels per split.
    """
    sizes = sizes or {"train": 3, "val": 2, "test": 1}
    raw: dict[str, list[np.ndarray]] = {}
    for split, n in sizes.items():
        lines, raw[split] = [], []
        for i in range(n):
            name = f"0001TP_{split}_{i:04d}.png"
            label = block_labels(height, width, list(range(12)), offset=i, block=block)
            train_ids = np.where(label == 11, 255, label)
            save_png(root / split / name, pattern_image(train_ids))
            save_png(root / f"{split}annot" / name, label)
            raw[split].append(label)
            if list_style == "segnet":
                lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
            else:
                lines.append(f"{split}/{name} {split}annot/{name}")
        if list_style != "none":
            (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return raw


# --------------------------------------------------------------------------- VOC + SBD


def make_voc(root: Path, train: int = 3, val: int = 2, height: int = 30,
             width: int = 40) -> dict[str, object]:
    """``VOCdevkit/VOC2012`` with JPEGImages, palette SegmentationClass and the split lists.

    Labels cycle through 0..20 with a 255 border row. Returns the VOC folder, ids and the
    raw label of every id.
    """
    voc = root / "VOCdevkit" / "VOC2012"
    palette = voc_colormap(21)
    ids = {"train": [f"2007_{i:06d}" for i in range(train)],
           "val": [f"2008_{i:06d}" for i in range(val)]}
    labels = {}
    for split_ids in ids.values():
        for k, name in enumerate(split_ids):
            label = block_labels(height, width, list(range(21)), offset=3 * k + len(name))
            label[height // 2, :] = 255  # an object border
            save_jpg(voc / "JPEGImages" / f"{name}.jpg", pattern_image(label))
            save_palette_png(voc / "SegmentationClass" / f"{name}.png", label, palette)
            labels[name] = label
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, split_ids in ids.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    (sets / "trainval.txt").write_text("".join(f"{i}\n" for i in ids["train"] + ids["val"]))
    return {"voc": voc, "ids": ids, "labels": labels}


def make_sbd(root: Path, voc: Path, voc_ids: dict[str, list[str]], extra: int = 3,
             height: int = 30, width: int = 40) -> dict[str, object]:
    """``benchmark_RELEASE/dataset`` with ``cls/<id>.mat`` (GTcls.Segmentation) and lists.

    SBD covers ``extra`` new images (also added to VOC's JPEGImages, as in VOC 2012), one
    VOC train image and one VOC val image (which train_aug must leave out).
    """
    dataset = root / "benchmark_RELEASE" / "dataset"
    new_ids = [f"2009_{i:06d}" for i in range(extra)]
    sbd_train = new_ids[:-1] + [voc_ids["train"][0]]
    sbd_val = new_ids[-1:] + [voc_ids["val"][0]]
    labels = {}
    for k, name in enumerate(sbd_train + sbd_val):
        seg = block_labels(height, width, list(range(21)), offset=5 * k + 1)
        gt = {"Segmentation": seg, "Boundaries": np.zeros((20, 1), object),
              "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)}
        (dataset / "cls").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(dataset / "cls" / f"{name}.mat", {"GTcls": gt})
        labels[name] = seg
        if not (voc / "JPEGImages" / f"{name}.jpg").exists():
            save_jpg(voc / "JPEGImages" / f"{name}.jpg", pattern_image(seg))
    (dataset / "train.txt").write_text("".join(f"{i}\n" for i in sbd_train))
    (dataset / "val.txt").write_text("".join(f"{i}\n" for i in sbd_val))
    expected = sorted((set(sbd_train) | set(sbd_val) | set(voc_ids["train"]))
                      - set(voc_ids["val"]))
    return {"sbd": root / "benchmark_RELEASE", "labels": labels, "train_aug": expected,
            "new_ids": new_ids}


# --------------------------------------------------------------------------- Cityscapes

# labelIds used by the miniature with the trainId each must become.
CITYSCAPES_IDS = {7: 0, 8: 1, 11: 2, 26: 13, 33: 18, 0: 255, 4: 255, 9: 255, 30: 255}


def make_cityscapes(root: Path, cities: dict[str, dict[str, int]] | None = None,
                    height: int = 24, width: int = 48) -> dict[str, object]:
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``.

    Returns the labelIds written per image stem and the number of images per split.
    """
    cities = cities or {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2}}
    written, counts = {}, {}
    ids = list(CITYSCAPES_IDS)
    for split, per_city in cities.items():
        counts[split] = 0
        for city, n in per_city.items():
            for i in range(n):
                stem = f"{city}_{i:06d}_000019"
                label_ids = block_labels(height, width, ids, offset=i)
                train_ids = np.vectorize(CITYSCAPES_IDS.get)(label_ids).astype(np.uint8)
                save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                         pattern_image(train_ids))
                save_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                         label_ids)
                # the other gtFine files of the release, which the loader must not pick up
                save_png(root / "gtFine" / split / city / f"{stem}_gtFine_color.png",
                         np.zeros((height, width, 3), np.uint8))
                save_png(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png",
                         label_ids.astype(np.uint8))
                written[stem] = label_ids
                counts[split] += 1
    return {"label_ids": written, "counts": counts}


# --------------------------------------------------------------------------- SUN RGB-D


def make_sunrgbd(root: Path, train: int = 2, test: int = 2, depth: bool = True,
                 height: int = 30, width: int = 40, block: int = BLOCK) -> dict[str, object]:
    """The 37-class release: ``SUNRGBD-{train,test}_images/img-NNNNNN.jpg``, labels in
    ``sunrgbd_train_test_labels/img-NNNNNN.png`` (test first, train from 5051), depth in
    ``sunrgbd_{split}_depth/N.png`` (16-bit). Returns raw labels and depths per split.
    """
    labels: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    depths: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, n in (("train", train), ("test", test)):
        for i in range(1, n + 1):
            raw = block_labels(height, width, list(range(38)), offset=7 * i + len(split),
                               block=block)
            train_ids = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            save_jpg(root / f"SUNRGBD-{split}_images" / f"img-{i:06d}.jpg",
                     pattern_image(train_ids))
            label_number = i + 5050 if split == "train" else i
            save_png(root / "sunrgbd_train_test_labels" / f"img-{label_number:06d}.png", raw)
            labels[split].append(raw)
            d = (np.arange(height * width, dtype=np.uint32).reshape(height, width) * 50
                 + 1000 * i).astype(np.uint16)
            if depth:
                path = root / f"sunrgbd_{split}_depth" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(d).save(path)
            depths[split].append(d)
    return {"labels": labels, "depths": depths}


# --------------------------------------------------------------------------- COCO

COCO_CATS = [  # a subset of the real table (ids and names as in instances_*2017.json)
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 22, "name": "elephant", "supercategory": "animal"},
    {"id": 63, "name": "couch", "supercategory": "furniture"},
]


def _rect_polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """A COCO polygon covering pixel columns x0..x1-1 and rows y0..y1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    from pycocotools import mask as mask_utils

    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    # uncompressed RLE (as crowd annotations use): run lengths in column-major order
    flat = mask.astype(np.uint8).ravel(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def make_coco(root: Path, split: str = "val", height: int = 40,
              width: int = 60) -> dict[str, object]:
    """``annotations/instances_{split}2017.json`` and ``{split}2017/*.jpg``.

    Image 1: a large couch (polygon) with a small dog (compressed RLE) on it, a person
    (polygon) partly over a crowd of people (uncompressed RLE, iscrowd=1), and an elephant.
    Image 2: a car of 1260 pixels (uncompressed RLE). Image 3: only an elephant (no VOC
    category). Summed areas of the train filter (more than 1000 kept): image 1 943 with the
    VOC classes (crowd included), 1043 with all; image 2 1260; image 3 100 (all) or 0 (VOC).
    Returns the expected masks for ``classes=voc`` and ``classes=all``.
    """
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": height, "width": width}
              for i in (1, 2, 3)]
    anns, next_id = [], 100

    def add(image_id, cat, seg, area, iscrowd=0):
        nonlocal next_id
        next_id += 1
        anns.append({"id": next_id, "image_id": image_id, "category_id": cat,
                     "segmentation": seg, "area": float(area), "iscrowd": iscrowd,
                     "bbox": [0, 0, 1, 1]})

    dog = np.zeros((height, width), np.uint8)
    dog[12:18, 12:20] = 1
    crowd = np.zeros((height, width), np.uint8)
    crowd[25:35, 30:50] = 1
    car = np.zeros((height, width), np.uint8)
    car[2:38, 5:40] = 1
    # listed small-first, so painting in file order would get the overlap wrong
    add(1, 18, _rle(dog, compressed=True), dog.sum())
    add(1, 63, _rect_polygon(5, 5, 30, 22), 25 * 17)
    add(1, 1, _rle(crowd, compressed=False), crowd.sum(), iscrowd=1)
    add(1, 1, _rect_polygon(40, 20, 55, 38), 15 * 18)
    add(1, 22, _rect_polygon(0, 30, 10, 40), 100)
    add(2, 3, _rle(car, compressed=False), car.sum())
    add(3, 22, _rect_polygon(10, 10, 20, 20), 100)
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps({"info": {}, "licenses": [], "images": images,
                                    "annotations": anns, "categories": COCO_CATS}))
    for info in images:
        save_jpg(root / f"{split}2017" / info["file_name"],
                 np.full((height, width, 3), 40 * info["id"], np.uint8))
    return {"ann_file": ann_file, "images": images, "dog": dog, "crowd": crowd, "car": car}


# --------------------------------------------------------------------------- ADE20K

# raw ADE20K labels the miniature uses: 0 (other, ignored), the first, a middle and the last
ADE20K_RAW = [0, 1, 2, 75, 149, 150]


def make_ade20k(root: Path, sizes: dict[str, int] | None = None, height: int = 30,
                width: int = 40) -> dict[str, object]:
    """``ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*`` as unzipped.

    Labels cycle through ``ADE20K_RAW``; ``objectInfo150.txt`` and ``sceneCategories.txt``
    sit beside the folders as in the archive. Returns the dataset folder and the raw label
    of each file stem.
    """
    sizes = sizes or {"training": 3, "validation": 2}
    ade = root / "ADEChallengeData2016"
    labels = {}
    for folder, n in sizes.items():
        prefix = "ADE_train" if folder == "training" else "ADE_val"
        for i in range(1, n + 1):
            stem = f"{prefix}_{i:08d}"
            raw = block_labels(height, width, ADE20K_RAW, offset=i)
            train_ids = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            save_jpg(ade / "images" / folder / f"{stem}.jpg", pattern_image(train_ids % 40))
            save_png(ade / "annotations" / folder / f"{stem}.png", raw)
            labels[stem] = raw
    (ade / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t"
                                           "1172\twall\n")
    (ade / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\n")
    return {"ade": ade, "labels": labels}


# --------------------------------------------------------------------------- PASCAL-Context

# labels.txt indices of the 59 classes in alphabetical order (the Detail API's ids, which
# PyTorch-Encoding's pcontext maps); the other indices of the miniature's labels.txt get
# placeholder names: only the format and the 59 names matter to the converter.
CONTEXT_59_INDICES = [2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85,
                      98, 104, 105, 113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258,
                      259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366,
                      368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458]
# LabelMap values of the miniature -> the PNG value (0 background, 1..59) they must become:
# unlabelled 0, a class outside the 59 (1), aeroplane, bedclothes / cloth / table (spelled
# bedcloth / clothes / diningtable in 59_labels.txt), person, wood
CONTEXT_RAW_TO_PNG = {0: 0, 1: 0, 2: 1, 19: 4, 80: 18, 284: 37, 397: 50, 458: 59}


def make_pascal_context(root: Path, train: int = 3, val: int = 2, height: int = 30,
                        width: int = 40) -> dict[str, object]:
    """VOC 2010 (``VOCdevkit/VOC2010/JPEGImages``, ``ImageSets/Main/{train,val}.txt``) and
    the authors' annotations in ``context/``: ``trainval/<id>.mat`` (``LabelMap``, uint16
    indices into labels.txt), ``labels.txt`` (459 ``"<index>: <name>"`` lines) and
    ``59_labels.txt`` (``"<k>: <name>"``, the VOC classes first, with FCN's three spellings).

    Returns the VOC folder, the context folder, ids per split and each id's LabelMap.
    """
    from segtrain.data.pascal_context import CLASS_NAMES_59

    voc = root / "VOCdevkit" / "VOC2010"
    context = root / "context"
    names = dict(zip(CONTEXT_59_INDICES, CLASS_NAMES_59))
    (context / "trainval").mkdir(parents=True, exist_ok=True)
    (context / "labels.txt").write_text("".join(
        f"{i}: {names.get(i, f'other class {i}')}\n" for i in range(1, 460)))
    spelled = {"table": "diningtable", "bedclothes": "bedcloth", "cloth": "clothes"}
    voc_first = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                 "cow", "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
                 "sofa", "train", "tvmonitor"]
    order = voc_first + [n for n in CLASS_NAMES_59 if n not in voc_first]
    (context / "59_labels.txt").write_text("".join(
        f"{k}: {spelled.get(n, n)}\n" for k, n in enumerate(order, 1)))
    ids = {"train": [f"2008_{i:06d}" for i in range(train)],
           "val": [f"2010_{i:06d}" for i in range(val)]}
    label_maps = {}
    for k, name in enumerate(ids["train"] + ids["val"]):
        label_map = np.asarray(list(CONTEXT_RAW_TO_PNG), np.uint16)[
            block_labels(height, width, list(range(len(CONTEXT_RAW_TO_PNG))), offset=k)]
        png = np.vectorize(CONTEXT_RAW_TO_PNG.get)(label_map)
        save_jpg(voc / "JPEGImages" / f"{name}.jpg", pattern_image(png % 40))
        scipy.io.savemat(context / "trainval" / f"{name}.mat", {"LabelMap": label_map})
        label_maps[name] = label_map
    sets = voc / "ImageSets" / "Main"
    sets.mkdir(parents=True, exist_ok=True)
    for split, split_ids in ids.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    (sets / "trainval.txt").write_text("".join(f"{i}\n" for i in ids["train"] + ids["val"]))
    return {"voc": voc, "context": context, "ids": ids, "label_maps": label_maps}
