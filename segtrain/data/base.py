"""The dataset contract shared by every dataset module.

An item is ``{"image": float32 CxHxW normalised, "mask": int64 HxW, "meta": {...}}`` with
labels in ``0..num_classes-1`` plus one ``ignore_index`` (``dataset.ignore_index``, passed to
every dataset's constructor; 255 where a dataset is built by hand). A dataset whose
``keep_rgb`` is set (the evaluation set: ``segtrain.app.build_val_set``) adds ``"rgb"``: the
RGB channels of the image as read from disk, uint8 HxWx3, through the same geometric
transforms as the mask, so the dense CRF and the sample figures see exactly that image (no
un-normalisation, whatever ``dataset.mean``/``std`` are: raw pixels, RGB-D stacks). A dataset
whose ``keep_rows`` is set (the training set with ``dataset.source_rows: true``:
``segtrain.app.build_train_set``) adds ``"rows"``: float32 HxW, each pixel's row in the image
as read, as a fraction of its height (1.0 where padding), through the same geometric
transforms (``segtrain.data.source_rows``), for models that take them (HANet). A dataset
module subclasses
``SegmentationDataset`` and implements ``__len__`` and ``load(index)``, which returns the
raw image (uint8 HxWx3, or float32 HxWxC on a 0..255 scale when extra channels such as
depth are stacked) and the mask already mapped to train ids (uint8/int HxW).

Every problem a user can fix (missing folder, unreadable file, label value outside the
classes, empty split) raises ``DatasetError`` with the file and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from segtrain.data import source_rows
from segtrain.errors import UserError

if TYPE_CHECKING:
    from segtrain.data.class_uniform import Centroid

IGNORE_INDEX = 255  # the constructors' default; a run passes dataset.ignore_index


class DatasetError(UserError):
    """A dataset problem the user can fix: missing files, bad labels, empty split."""


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """Read an image file as a uint8 array, naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode) if mode else img)
    except FileNotFoundError as err:
        raise DatasetError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as err:  # the last: PIL refused a huge image
        raise DatasetError(f"cannot read image file {path}: {err}") from err


def read_label(path: str | Path) -> np.ndarray:
    """Read a label image keeping its raw values (palette indices for 'P' images)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                img = img.convert("L")
            return np.asarray(img)
    except FileNotFoundError as err:
        raise DatasetError(f"label file not found: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot read label file {path}: {err}") from err


def read_depth(path: str | Path) -> np.ndarray:
    """Read a 16-bit depth PNG as a uint16 HxW array, naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            depth = np.asarray(img)
    except FileNotFoundError as err:
        raise DatasetError(f"depth file not found: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"cannot read depth file {path}: {err}") from err
    if depth.ndim != 2:
        raise DatasetError(f"depth file {path}: expected a single-channel 16-bit PNG, "
                           f"got shape {depth.shape}")
    return depth.astype(np.uint16, copy=False)


def make_lut(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A lookup table raw value -> train id; values absent from ``mapping`` map to -1."""
    lut = np.full(size, -1, np.int16)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


def remap_labels(raw: np.ndarray, lut: np.ndarray, path: str | Path, expected: str) -> np.ndarray:
    """Map raw label values through ``lut`` (see ``make_lut``); unknown values are an error.

    ``expected`` describes the valid raw values for the message, e.g. "0..11".
    """
    if raw.ndim != 2:
        raise DatasetError(f"label file {path}: expected a single-channel label image, "
                           f"got shape {raw.shape}")
    raw = raw.astype(np.int64, copy=False) if raw.dtype != np.uint8 else raw
    too_big = raw >= len(lut)
    if too_big.any():
        bad = np.unique(raw[too_big])[:10].tolist()
        raise DatasetError(f"label file {path}: value(s) {bad} are not labels of this "
                           f"dataset (expected {expected})")
    out = lut[raw]
    unknown = out < 0
    if unknown.any():
        bad = np.unique(raw[unknown])[:10].tolist()
        raise DatasetError(f"label file {path}: value(s) {bad} are not labels of this "
                           f"dataset (expected {expected})")
    return out.astype(np.uint8)


def require_root(root: str | Path, name: str, layout: str, how_to_get: str) -> Path:
    """Return ``root`` as a Path, or explain the expected layout when it does not exist."""
    if root is None or str(root) in ("", "???"):
        raise DatasetError(f"{name}: dataset.root is not set. Expected layout: {layout}. "
                           f"{how_to_get}")
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise DatasetError(f"{name}: dataset root {path} does not exist or is not a folder. "
                           f"Expected layout: {layout}. {how_to_get}")
    return path


def read_list_file(path: Path, name: str, split: str) -> list[list[str]]:
    """Read a split list: one sample per line, whitespace-separated fields; no empty split."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DatasetError(f"{name}: cannot read split list {path}: {err}") from err
    rows = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    if not rows:
        raise DatasetError(f"{name}: split '{split}' is empty: the list file {path} has no "
                           f"entries")
    return rows


def require_split(name: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise DatasetError(f"{name}: unknown split '{split}', expected one of {splits}")


def require_nonempty(items: Sequence[Any], name: str, split: str, where: str) -> None:
    if len(items) == 0:
        raise DatasetError(f"{name}: split '{split}' is empty: no samples found in {where}")


class SegmentationDataset(Dataset):
    """Base class: applies the albumentations pipeline and checks the label range.

    Subclasses set ``class_names`` and ``palette`` (Nx3 uint8), map their void labels to
    ``self.ignore_index``, and implement ``__len__`` and ``load``. The normalisation is not a
    property of the dataset class: it is ``dataset.mean``/``std`` of the config, applied by
    the transform pipeline.

    Args:
        transforms: the albumentations pipeline (``segtrain.data.transforms.compose``).
        ignore_index: the label of pixels that count nowhere (``dataset.ignore_index``); a
            uint8 value (masks are stored as uint8) that is no class id.
        keep_rgb: items also carry ``"rgb"``, the image as read (the module docstring).
        keep_rows: items also carry ``"rows"``, each pixel's source row (idem).
    """

    class_names: Sequence[str] = ()
    palette: np.ndarray = np.zeros((0, 3), np.uint8)
    #: a short name used in messages and cache file names
    name: str = "dataset"

    def __init__(self, transforms: Callable[..., dict] | None = None,
                 ignore_index: int = IGNORE_INDEX, keep_rgb: bool = False,
                 keep_rows: bool = False) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or \
                not 0 <= ignore_index <= 255:
            raise DatasetError(f"{self.name}: dataset.ignore_index={ignore_index!r}: expected "
                               f"an integer in 0..255 that is no class id (masks are uint8)")
        self.transforms = transforms
        self.ignore_index = ignore_index
        self.keep_rgb, self.keep_rows = keep_rgb, keep_rows
        extra = [key for key, kept in (("rgb", keep_rgb), ("rows", keep_rows)) if kept]
        if transforms is not None and extra:
            # second masks that follow every geometric step of the pipeline (nearest neighbour)
            transforms.add_targets(dict.fromkeys(extra, "mask"))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Channels of the image this dataset yields (3 = RGB; 4 = RGB + depth)."""
        return 3

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Return (image uint8 HxWxC, mask HxW in train ids, meta). Abstract."""
        raise NotImplementedError  # pragma: no cover

    def load_mask(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Return only the mask and meta (class statistics); subclasses may skip the image."""
        _, mask, meta = self.load(index)
        return mask, meta

    def check_labels(self, mask: np.ndarray, source: str) -> None:
        values = np.unique(mask)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if bad.size:
            raise DatasetError(
                f"{source}: label value(s) {bad.tolist()} outside 0..{self.num_classes - 1} "
                f"and not the ignore index {self.ignore_index}"
            )

    def item_names(self) -> list[str]:
        """The split's samples, one name each in index order, without reading a file (keys
        the class-uniform index cache, ``segtrain.data.class_uniform``)."""
        raise NotImplementedError(f"{self.name} lists no item names")  # pragma: no cover

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index)

    def load_checked(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``load`` with the image and label sizes compared and the label values checked (a
        ``DatasetError`` naming the files); no transform runs."""
        image, mask, meta = self.load(index)
        source = str(meta.get("label_path", meta.get("name", index)))
        if image.shape[:2] != mask.shape[:2]:
            raise DatasetError(
                f"image {meta.get('image_path', index)} is {image.shape[1]}x{image.shape[0]} "
                f"but its label {source} is {mask.shape[1]}x{mask.shape[0]} (width x height)"
            )
        self.check_labels(mask, source)
        return image, mask, meta

    def item(self, index: int, centroid: Centroid | None = None) -> dict[str, Any]:
        """Item ``index``; a class-uniform sample passes its ``centroid``, which the crop
        (``transforms.RandomCrop``) covers, and ``meta["centroid_class"]`` names."""
        image, mask, meta = self.load_checked(index)
        meta = {**meta, "index": index, "orig_size": tuple(mask.shape[:2])}
        if centroid is not None:
            meta["centroid_class"] = centroid.class_id
        extra = {}  # the pipeline's second masks (the constructor's add_targets)
        if self.keep_rgb:
            extra["rgb"] = raw_rgb(image)  # no colour or normalisation step touches it
        if self.keep_rows:
            extra["rows"] = source_rows.encode(*mask.shape[:2])
        if self.transforms is not None:
            if centroid is not None:  # one point the geometric steps move with the image
                extra_points = {"keypoints": np.array([[centroid.x, centroid.y]], np.float32)}
            else:
                extra_points = {}
            out = self.transforms(image=image, mask=mask, **extra, **extra_points)
            image, mask = out["image"], out["mask"]
            extra = {key: out[key] for key in extra}
        rows = extra.get("rows")
        if rows is not None:
            rows = source_rows.decode(rows, meta["orig_size"][0])
        return to_item(image, mask, meta, extra.get("rgb"), rows)


def raw_rgb(image: np.ndarray) -> np.ndarray:
    """The RGB channels of an image as ``load`` returns it, as uint8 HxWx3 (an RGB-D stack
    holds the RGB values unchanged as float32 0..255)."""
    rgb = image[..., :3]
    return np.ascontiguousarray(rgb if rgb.dtype == np.uint8 else np.rint(rgb).astype(np.uint8))


def to_item(image: np.ndarray, mask: np.ndarray, meta: dict[str, Any],
            rgb: np.ndarray | None = None, rows: np.ndarray | None = None) -> dict[str, Any]:
    """Convert HxWxC float image and HxW mask to the tensors of the dataset contract."""
    if image.dtype == np.uint8:
        raise DatasetError(
            "the transform pipeline must end with normalisation (albumentations.Normalize) "
            "so images are float32; check dataset.train_transforms / val_transforms"
        )
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32))
    mask_t = torch.from_numpy(np.ascontiguousarray(mask, np.int64))
    item = {"image": image_t, "mask": mask_t, "meta": meta}
    if rgb is not None:
        item["rgb"] = torch.from_numpy(np.require(rgb, np.uint8, ("C", "W")))  # PIL: read-only
    if rows is not None:
        item["rows"] = torch.from_numpy(np.ascontiguousarray(rows, np.float32))
    return item


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (bit-interleaved label index), used where no official one exists."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def unique_names(names: Iterable[str]) -> list[str]:
    """Deduplicate while keeping order (list files sometimes repeat ids)."""
    seen: set[str] = set()
    out = []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out
