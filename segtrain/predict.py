"""Prediction entry point: label a folder of images with a trained run.

    python -m segtrain.predict run=outputs/<run> images=some/folder
    python -m segtrain.predict run=outputs/<run> images=photo.jpg
    python -m segtrain.predict run=outputs/<run> "images=shots/*_left.png"
    python -m segtrain.predict run=outputs/<run> images=some/folder out=preds eval=msc
    python -m segtrain.predict run=outputs/<run> images=some/folder eval=msc_crf checkpoint=last
    python -m segtrain.predict run=outputs/<run> images=<root>/leftImg8bit/test recursive=true \
        format=cityscapes                                   # also format=voc, format=ade20k

``images`` is an image file, a folder or a glob pattern. For each ``.jpg/.jpeg/.png/.bmp``
in it (sorted; with ``recursive=true`` also in its subfolders, or ``**`` in a pattern) it
writes, under ``out`` (default ``<run>/predict/<time>/``):

    labels/<name>.png    uint8 train ids (0..num_classes-1), the raw prediction
    color/<name>.png     the prediction in the dataset's palette
    overlay/<name>.png   the palette blended over the image (``alpha``)

or, with ``format=cityscapes|voc|ade20k``, only ``submission/``: the benchmark server's label
files in its layout and label space (``segtrain/submission.py``), ready to be zipped.

Each image goes through the Python API (``segtrain.load_run(run).predict(image)``): the run's
validation transforms (its normalisation), then the one inference path of
``segtrain.evaluate`` with the ``eval`` option (whole image by default; ``eval=msc`` /
``slide`` / ``msc_crf`` as there) at the image's own size, at ``eval.precision``. The dense
CRF gets the image as read, exactly as in ``segtrain.evaluate``, so both give the same label
map for the same image and checkpoint. An image that cannot be read (or is refused by the
API: empty, too large for whole-image inference) is named and skipped; the others are
written, and the command then ends with one ``error:`` line naming every skipped image
(exit status 1).
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from segtrain import app
from segtrain.api import open_run, segmenter
from segtrain.cli import user_errors
from segtrain.data.base import read_image
from segtrain.errors import UserError
from segtrain.viz import colorize, overlay

log = logging.getLogger("segtrain")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class PredictError(UserError):
    """Nothing to predict (no such file, folder or pattern; no images; names collide), or
    some images could not be labelled (the others are written)."""


def list_images(images: str | Path, recursive: bool = False) -> list[Path]:
    """The images ``images`` names, sorted: a file, the images in a folder (and its
    subfolders if ``recursive``) or those a glob pattern matches (``**`` with ``recursive``)."""
    text = str(images)
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        where = f"in {path} ({'in it or its subfolders' if recursive else 'directly in it'})"
    elif glob.has_magic(text):
        found = (Path(p) for p in glob.glob(str(path), recursive=recursive))
        where = f"matching {text}"
    else:
        raise PredictError(f"images={text}: no such file or folder, and not a glob pattern "
                           f"(images= takes an image file, a folder or a pattern like "
                           f"'photos/*.jpg')")
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PredictError(f"no images {where}: looked for {', '.join(IMAGE_SUFFIXES)} files")
    stems: dict[str, Path] = {}
    for p in files:
        # outputs are named <stem>.png: a.jpg and a.png would overwrite each other
        if p.stem in stems:
            raise PredictError(f"{stems[p.stem]} and {p} would both be written as "
                               f"{p.stem}.png; rename one of them")
        stems[p.stem] = p
    return files


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def predict(cfg: DictConfig) -> list[Path]:
    """Write label, colour and overlay PNGs for every image; returns the label paths.

    Args:
        cfg: the ``conf/predict.yaml`` config (run, images, out, checkpoint, eval, ...).
    """
    # fail on a bad folder before loading anything
    files = list_images(cfg.images, bool(cfg.get("recursive", False)))
    run = open_run(cfg.run, str(cfg.checkpoint))
    submission = None
    if cfg.get("format"):  # a run or an image name that does not fit stops here
        submission = app.instantiate(cfg.format, dataset=str(run.config.dataset.name),
                                     num_classes=int(run.config.dataset.num_classes))
        for file in files:
            submission.relative_path(file)
    seg = segmenter(run, device=str(cfg.device), eval=cfg.eval)
    names = dict(enumerate(seg.class_names))

    out = Path(str(cfg.out)).expanduser()
    for sub in ("labels", "color", "overlay") if submission is None else ("submission",):
        (out / sub).mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    for path in files:
        try:
            rgb = read_image(path)  # DatasetError naming the file when it cannot be read
            label = seg.predict(rgb).astype(np.uint8)  # InputError: empty, too large
        except UserError as err:
            log.error("%s", err)
            failed.append(f"{path} ({err})")
            continue
        if submission is not None:
            written.append(submission.write(label, path, out / "submission"))
        else:
            save_png(label, out / "labels" / f"{path.stem}.png")
            save_png(colorize(label, seg.palette, seg.ignore_index),
                     out / "color" / f"{path.stem}.png")
            save_png(overlay(rgb, label, seg.palette, float(cfg.alpha), seg.ignore_index),
                     out / "overlay" / f"{path.stem}.png")
            written.append(out / "labels" / f"{path.stem}.png")
        counts = np.bincount(label.ravel(), minlength=seg.num_classes)
        log.info("%s %dx%d: %s", path.name, rgb.shape[1], rgb.shape[0],
                 ", ".join(f"{names.get(c, c)} {100 * n / label.size:.0f}%"
                           for c, n in enumerate(counts) if n))
    if submission is not None:
        log.info("%d images -> %s (format=%s; zip the folder's contents for the server)",
                 len(written), out / "submission", submission.benchmark)
    else:
        log.info("%d images -> %s (labels/, color/, overlay/)", len(written), out)
    if failed:
        raise PredictError(f"{len(failed)} of {len(files)} images could not be labelled "
                           f"(the other {len(written)} were written to {out}): "
                           f"{'; '.join(failed)}")
    return written


@hydra.main(config_path="conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
