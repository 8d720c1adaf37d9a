"""Python API: a trained run as a function from images to label maps, for a notebook or a
service, with no Hydra call on the user's side.

    from segtrain import load_run
    seg = load_run("outputs/<run>", checkpoint="best")          # or "last", or a .pt path
    labels = seg.predict(image)              # HxWx3 uint8 array or PIL image -> HxW int64
    probs = seg.predict(image, eval="msc", return_probs=True)   # -> KxHxW float32
    masks = seg.predict([a, b])                                 # a list in, a list out
    seg = load_run("best.pt", device="cpu", eval="msc_crf", overrides=["eval.crf.bi_w=5"])

The run's saved config (``<run>/.hydra/config.yaml``, else the copy in the checkpoint)
rebuilds the model and its validation transforms (the normalisation it was trained with).
``eval`` names an option of ``conf/eval/`` (whole, msc, msc_flip, msc_crf, crf_v1, slide),
composed as ``segtrain.evaluate`` composes it, with ``eval.*`` overrides. Each image runs
through ``segtrain.eval.inference.Inference``, the test-time path of ``segtrain.evaluate``,
``segtrain.predict`` and the trainer's evaluation, so the labels are the ones they count and
write for the same checkpoint and eval options. ``return_probs``: the softmax, or with a
CRF its marginals; their argmax is the label map.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from segtrain import app, runs
from segtrain.data.base import read_image
from segtrain.data.transforms import compose as compose_transforms
from segtrain.errors import ConfigError, UserError
from segtrain.eval.inference import Inference
from segtrain.runs import RunError

log = logging.getLogger("segtrain")

#: what ``Segmenter.predict`` takes as one image
ImageLike = np.ndarray | Image.Image | str | Path

#: the largest image (pixels, times the largest predictor scale squared) run through the
#: network in one piece: whole-image activations grow with the image (a 6000x6000 photo
#: needs tens of GB in a ResNet-101 at output stride 8); larger ones are refused with the
#: advice to slide a window (eval="slide"), whose network memory is that of one window
MAX_WHOLE_PIXELS = 4096 * 4096


class InputError(UserError):
    """An image given to ``Segmenter.predict`` is not an RGB image."""


def eval_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``eval=<name>`` option of conf/eval/ with ``eval.*`` overrides, as Hydra composes
    it for ``segtrain.evaluate``."""
    bad = [o for o in overrides if not o.lstrip("+~").startswith("eval.")]
    if bad:
        raise ConfigError(f"overrides {bad}: only eval.<key>=<value> overrides are taken")
    # inside the user's own Hydra application Hydra is initialised with their config
    # folder: set it aside (as hydra.initialize itself does) and put it back afterwards
    users = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(app.CONF_DIR), version_base="1.3"):
            return compose(overrides=[f"+eval={name}", *overrides]).eval
    except MissingConfigException:
        options = sorted(p.stem for p in (app.CONF_DIR / "eval").glob("*.yaml"))
        raise ConfigError(f"eval={name!r}: no such option; conf/eval/ has "
                          f"{', '.join(options)}") from None
    except HydraException as err:
        raise ConfigError(f"eval={name} with {list(overrides)}: {err}") from None
    finally:
        restore_gh_from_backup(users)


def as_rgb(image: ImageLike) -> np.ndarray:
    """An HxWx3 uint8 array: the array itself, a PIL image in RGB, or an image file read
    (PIL's decompression-bomb limit refuses a file of more than twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels before decoding it)."""
    if isinstance(image, (str, Path)):
        rgb = read_image(image)
    elif isinstance(image, Image.Image):
        rgb = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 \
            and image.dtype == np.uint8:
        rgb = image
    else:
        what = f"an array of shape {image.shape} and dtype {image.dtype}" \
            if isinstance(image, np.ndarray) else f"a {type(image).__name__}"
        raise InputError(f"expected an HxWx3 uint8 array, a PIL image or an image path, "
                         f"got {what}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InputError(f"empty image: {rgb.shape[0]}x{rgb.shape[1]} pixels (height x width "
                         f"must be at least 1x1)")
    return rgb


class Segmenter:
    """A trained run's model with its validation transforms and eval options.

    Args:
        model: the network with the checkpoint's weights, on ``device``.
        config: the run's training config.
        device: where the model and the images are.
        eval: the eval config used when ``predict`` is given none (``eval_config``; its
            inference: ``default``).
        overrides: ``eval.*`` overrides applied to every eval option named in ``predict``.
        source: the checkpoint file (for ``repr`` and the log).
        max_pixels: the largest image whole-image inference takes (``MAX_WHOLE_PIXELS``;
            None: no limit); sliding-window inference takes any size.
    """

    def __init__(self, model: torch.nn.Module, config: DictConfig, device: torch.device,
                 eval: DictConfig, overrides: Sequence[str] = (),
                 source: Path | None = None, max_pixels: int | None = MAX_WHOLE_PIXELS) -> None:
        self.model, self.config, self.device = model.eval(), config, device
        self.overrides, self.source, self.max_pixels = list(overrides), source, max_pixels
        self.transforms = compose_transforms(app.instantiate(config.dataset.val_transforms))
        self.num_classes = int(config.dataset.num_classes)
        self.ignore_index = int(config.dataset.ignore_index)
        # class attributes of the dataset module: no need for the dataset's files (COCO and
        # Pascal Context name theirs per instance: then no names, and the VOC colour map)
        dataset_cls = get_class(config.dataset.val._target_)
        self.class_names = list(getattr(dataset_cls, "class_names", ()))
        self.palette = app.palette_of(dataset_cls, self.num_classes)
        self.eval_config = eval
        self.default = self._inference(eval)
        self._cache: dict[str, Inference] = {}
        self._lock = threading.Lock()  # predict switches the model's output stride

    def __repr__(self) -> str:
        return (f"Segmenter({type(self.model).__name__}, {self.config.dataset.name}, "
                f"{self.num_classes} classes, {self.source}, device={self.device})")

    def _inference(self, eval: DictConfig) -> Inference:
        # replaced, not merged, as segtrain.evaluate does; the schema checks it
        inference = app.build_inference(runs.with_eval(self.config, eval))
        inference.check(self.model)  # eval.output_stride on a model that cannot: now
        return inference

    def inference(self, eval: str | None = None) -> Inference:
        """The inference of the eval option ``eval`` (None: the one given to load_run)."""
        if eval is None:
            return self.default
        if eval not in self._cache:
            self._cache[eval] = self._inference(eval_config(eval, self.overrides))
        return self._cache[eval]

    def image_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """The run's validation transforms of ``rgb``: a 1xCxHxW float32 batch on the device."""
        image = self.transforms(image=rgb)["image"]
        return torch.from_numpy(image.transpose(2, 0, 1).copy())[None].to(self.device,
                                                                         torch.float32)

    def check_size(self, rgb: np.ndarray, inference: Inference) -> None:
        """Refuse an image too large for whole-image inference (``max_pixels``)."""
        predictor = inference.predictor
        if self.max_pixels is None or predictor.mode != "whole":
            return
        h, w = rgb.shape[:2]
        pixels = h * w * max(predictor.scales) ** 2
        if pixels > self.max_pixels:
            raise InputError(
                f"image of {w}x{h} pixels is too large for whole-image inference "
                f"({pixels / 1e6:.1f} MP at scales {predictor.scales}, more than max_pixels="
                f"{self.max_pixels}): use eval='slide' (a window at a time), shrink the image, "
                f"or pass a larger max_pixels to load_run")

    def predict(self, image: ImageLike | Sequence[ImageLike], eval: str | None = None,
                return_probs: bool = False) -> np.ndarray | list[np.ndarray]:
        """Labels (HxW int64) of an image, or probabilities (KxHxW float32) with
        ``return_probs``; a list of images gives a list. ``eval``: an option of conf/eval/
        (None: the one given to load_run)."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        inference = self.inference(eval)
        results = []
        with self._lock, inference.applied_to(self.model):
            for item in images:
                rgb = as_rgb(item)
                self.check_size(rgb, inference)
                out = inference(self.model, self.image_tensor(rgb), rgb[None], return_probs)
                results.append(out[0].cpu().numpy())
        return results[0] if single else results


def _device(name: str | torch.device | None, config: DictConfig) -> torch.device:
    if isinstance(name, torch.device):
        return name
    chosen = str(config.trainer.get("device", "auto")) if name is None else name
    try:
        return app.pick_device(chosen)
    except ConfigError:
        raise ConfigError(f"device {chosen!r}{' (the run trained there)' if name is None else ''}"
                          f": CUDA is not available on this machine; pass device='cpu'") from None


def open_run(run: str | Path, checkpoint: str = "best") -> runs.Run:
    """A run folder or a checkpoint file opened by the run layer (``segtrain.runs``), refused
    when it takes RGB-D input; see ``load_run``."""
    opened = runs.open_run(run, checkpoint)
    if opened.config.dataset.get("use_depth"):
        raise RunError(f"the run {opened.folder or opened.checkpoint} was trained on RGB-D "
                       f"input (dataset.use_depth=true); predict takes RGB images only")
    return opened


def segmenter(run: runs.Run, device: str | torch.device | None = None,
              eval: str | Mapping[str, Any] = "whole", overrides: Sequence[str] = (),
              max_pixels: int | None = MAX_WHOLE_PIXELS) -> Segmenter:
    """The ``Segmenter`` of an opened run (``open_run``); see ``load_run``."""
    if isinstance(eval, str):
        eval = eval_config(eval, overrides)
    elif overrides:
        raise ConfigError("overrides go with an eval option's name, not an eval config node")
    runs.with_eval(run.config, eval)  # a bad eval value: refused before the model is built
    device = _device(device, run.config)
    model = runs.build_model(run, device)
    log.info("checkpoint %s (iteration %s) on %s", run.checkpoint, run.state.get("iteration", "?"),
             device)
    return Segmenter(model, run.config, device, OmegaConf.create(eval), overrides,
                     run.checkpoint, max_pixels)


def load_run(run: str | Path, checkpoint: str = "best", device: str | torch.device | None = None,
             eval: str | Mapping[str, Any] = "whole", overrides: Sequence[str] = (),
             max_pixels: int | None = MAX_WHOLE_PIXELS) -> Segmenter:
    """A trained run, ready to predict.

    Args:
        run: a training run folder, or a checkpoint file (its config is the one of the run
            folder two levels up, else the copy stored in it).
        checkpoint: ``best`` (falls back to ``last``), ``last`` or a path to a .pt; for a run
            folder only.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a torch.device; None: the run's
            ``trainer.device``.
        eval: the default eval option of conf/eval/ (or an eval config node).
        overrides: ``eval.*`` overrides, e.g. ``["eval.output_stride=8"]``.
        max_pixels: the largest image whole-image inference takes (``MAX_WHOLE_PIXELS``;
            None: no limit); a larger one is refused with one line (an ``InputError``)
            advising ``eval="slide"``, which takes any size PIL reads.
    """
    return segmenter(open_run(run, checkpoint), device=device, eval=eval, overrides=overrides,
                     max_pixels=max_pixels)
