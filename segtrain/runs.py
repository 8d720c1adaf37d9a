"""The run layer: the one route from a saved run (a run folder or a ``.pt``) to its config,
checkpoint and model, used by ``segtrain.evaluate``, ``segtrain.predict``, ``segtrain.export``,
``scripts/crf_search.py`` and the Python API (``segtrain.load_run``).

    run = open_run("outputs/<run>", checkpoint="best", eval=cfg.eval, dataset=cfg.dataset)
    model = build_model(run, torch.device("cpu"))

``open_run``: the folder (or file) -> the checkpoint chosen (``best`` falls back to ``last``,
``last``, or a path) -> the run's training config (``<run>/.hydra/config.yaml``, else the
resolved copy stored in the checkpoint) with the command's ``eval``/``dataset`` options merged
into a new config -> the config schema (``segtrain.config_schema``) on the sections a saved
run is opened with, so ``eval.predictor.mode=foo`` ends in the same one-line ``ConfigError``
here as for training. The entry points pass their options as arguments; none writes into the
config. A run folder is a folder holding ``.hydra/config.yaml`` or a checkpoint in
``checkpoints/``; anything else is refused before anything is written into it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segtrain import config_schema
from segtrain.builders import build_model as build_network
from segtrain.core import checkpoint as checkpoints
from segtrain.errors import UserError

log = logging.getLogger("segtrain")

CHECKPOINT_NAMES = ("best.pt", "last.pt")
METRICS_FILE = "metrics.json"  # the training's scores and state (engine/callbacks/run_log.py)


class RunError(UserError):
    """The ``run=`` folder is missing or is not a training run (no config)."""


@dataclass(frozen=True)
class Run:
    """A saved run opened for evaluation, prediction or export.

    Attributes:
        folder: the run folder; None for a lone checkpoint file.
        checkpoint: the checkpoint file chosen.
        state: its contents (weights on the CPU, iteration, ...).
        config: the training config with the command's options, schema-checked.
    """

    folder: Path | None
    checkpoint: Path
    state: dict[str, Any]
    config: DictConfig

    @property
    def own_checkpoint(self) -> bool:
        """Whether the checkpoint is one of the run's own ``checkpoints/*.pt``."""
        return self.folder is not None and self.checkpoint.parent == self.folder / "checkpoints"


# -- the folder and the checkpoint ---------------------------------------------------------
def is_run_folder(path: Path) -> bool:
    """A folder training wrote: its ``.hydra/config.yaml`` or a checkpoint."""
    return path.is_dir() and ((path / ".hydra" / "config.yaml").is_file() or any(
        (path / "checkpoints" / name).is_file() for name in CHECKPOINT_NAMES))


def run_folder(run: str | Path) -> Path:
    """``run`` as a run folder, else a ``RunError`` saying what was expected."""
    path = Path(str(run)).expanduser()
    if not path.is_dir():
        raise RunError(f"run folder not found: {path} (run= takes a training run folder, "
                       f"e.g. outputs/<date>/<time>_<model>_<dataset>)")
    if not is_run_folder(path):
        raise RunError(f"{path} is not a training run folder: it has neither .hydra/config.yaml "
                       f"nor checkpoints/best.pt or last.pt (run= takes the folder a "
                       f"training run wrote)")
    return path


_scratch: list[str] = []


def _scratch_folder() -> str:
    """A private folder of this process (``mkdtemp``: a new name, mode 0700, never an
    existing path or a planted link), removed at exit."""
    if not _scratch:
        _scratch.append(tempfile.mkdtemp(prefix="segtrain_no_run_"))
        atexit.register(shutil.rmtree, _scratch[0], True)
    return _scratch[0]


def hydra_folder_root(run: str) -> str:
    """``${segtrain.run:${run}}``, where the entry points' Hydra folder starts
    (conf/evaluate.yaml, predict.yaml, export.yaml).

    Hydra creates its output folder before main() runs, so a mistyped ``run=`` (or a folder
    that is not a run) would get an ``eval/`` or ``predict/`` tree. Such a ``run`` gets a
    private scratch folder instead, and main() then stops with the ``RunError`` message
    (raising here would bury it under a traceback of Hydra's interpolation machinery). A
    checkpoint file (predict takes one) gets its run folder, else its own folder.
    """
    path = Path(str(run)).expanduser()
    if path.is_file() and path.suffix == ".pt":  # the API's and predict's lone checkpoint
        folder = path.parent.parent
        return str(folder if is_run_folder(folder) else path.parent)
    return str(run) if is_run_folder(path) else _scratch_folder()


OmegaConf.register_new_resolver("segtrain.run", hydra_folder_root, replace=True)


def checkpoint_path(run_dir: Path, choice: str) -> Path:
    """``best`` (falls back to ``last`` when the run never evaluated), ``last``, or a path."""
    ckpts = run_dir / "checkpoints"
    if choice == "best":
        best = ckpts / "best.pt"
        if best.is_file():
            return best
        if (ckpts / "last.pt").is_file():
            log.info("%s has no best.pt (the run never evaluated): using last.pt", ckpts)
            return ckpts / "last.pt"
        raise checkpoints.CheckpointError(
            f"checkpoint not found: the run {run_dir} has neither checkpoints/best.pt nor "
            f"checkpoints/last.pt (checkpoint=best|last|<path to a .pt>)")
    if choice == "last":
        return checkpoints.resolve(ckpts / "last.pt")
    return checkpoints.resolve(choice)


def saved_config(run_dir: Path | None, state: dict[str, Any], source: Path) -> DictConfig:
    """The training config: Hydra's copy in the run folder, else the checkpoint's (a lone
    checkpoint: ``run_dir`` None)."""
    where = run_dir or source
    saved = None if run_dir is None else run_dir / ".hydra" / "config.yaml"
    if saved is not None and saved.is_file():
        cfg = OmegaConf.load(saved)
    elif state.get("config"):
        if saved is not None:
            log.info("%s not found: using the config stored in %s", saved, source)
        cfg = OmegaConf.create(state["config"])
    else:
        raise RunError(f"the run {where} has no config: neither .hydra/config.yaml nor a "
                       f"'config' entry in {source}")
    if not isinstance(cfg, DictConfig) or "model" not in cfg or "dataset" not in cfg:
        raise RunError(f"the config of {where} is not a segtrain training config "
                       f"(no model/dataset section)")
    return cfg


# -- what training and evaluation left in the folder ---------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON record of the run, None when absent; both writers replace files atomically
    (core/json_files.py), so an unreadable one is not half-written: it is reported."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise RunError(f"{path}: not valid JSON ({err}); segtrain writes it atomically, so "
                       f"something else changed it") from None
    return data if isinstance(data, dict) else None


def training_record(run_dir: Path) -> dict[str, Any] | None:
    """``<run>/metrics.json``: the final scores, ``finished`` and ``status`` (running |
    interrupted | failed | ...); None before the first evaluation or stop wrote it."""
    return _read_json(run_dir / METRICS_FILE)


def finished(run_dir: Path) -> bool:
    """Whether training reached ``trainer.max_iters`` (metrics.json ``"finished": true``)."""
    record = training_record(run_dir)
    return bool(record and record.get("finished"))


def resume_checkpoint(run_dir: Path) -> Path | None:
    """``checkpoints/last.pt``, what ``trainer.resume=auto`` continues from, or None."""
    last = run_dir / "checkpoints" / "last.pt"
    return last if last.is_file() else None


def evaluation_stem(run_dir: Path | None, checkpoint: Path, name: str) -> str:
    """The file stem of ``segtrain.evaluate name=<name>``'s results: ``eval_<name>`` for the
    run's best.pt; the run's other checkpoints add their stem (``eval_whole_last``); a
    checkpoint from elsewhere adds its stem and a hash of its path, so it never replaces the
    run's own results."""
    stem = f"eval_{name}"
    if run_dir is not None and checkpoint == run_dir / "checkpoints" / "best.pt":
        return stem
    if run_dir is not None and checkpoint.parent == run_dir / "checkpoints":
        return f"{stem}_{checkpoint.stem}"
    digest = hashlib.sha1(str(checkpoint.resolve()).encode()).hexdigest()[:8]
    return f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]', '_', checkpoint.stem)}_{digest}"


def evaluation_record(run_dir: Path, name: str, checkpoint: str = "best") -> dict[str, Any] | None:
    """``segtrain.evaluate run=<run_dir> name=<name> checkpoint=<checkpoint>``'s results
    (scores, the checkpoint scored), None if that evaluation has not been written."""
    try:
        path = checkpoint_path(run_dir, checkpoint)
    except checkpoints.CheckpointError:
        return None
    return _read_json(run_dir / f"{evaluation_stem(run_dir, path, name)}.json")


# -- the command's options over the run's config -------------------------------------------
def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _leaves(v, f"{prefix}.{k}")]
    return [(prefix, node)]


def _with_eval(run_cfg: DictConfig, eval: Mapping | None,
               eval_keys: Sequence[str] | None) -> DictConfig:
    if eval is None:
        return run_cfg
    eval = OmegaConf.create(eval) if not isinstance(eval, DictConfig) else eval
    if eval_keys is None:
        # replaced, not merged: whole.yaml over slide.yaml must not keep the slide crop
        cfg = run_cfg.copy()
        cfg.eval = eval
        return cfg
    # the run's own eval (an experiment's eval.predictor.scales) with the command's keys
    # over it; a run older than an eval key (eval.precision) gets the command's value of it
    merged = OmegaConf.merge(run_cfg, {"eval": {k: eval[k] for k in eval
                                                if k not in run_cfg.get("eval", {})}})
    for key in eval_keys:
        OmegaConf.update(merged, key, OmegaConf.select(OmegaConf.create({"eval": eval}), key),
                         merge=False, force_add=True)
    return merged


def _with_dataset(run_cfg: DictConfig, dataset: Mapping | None) -> DictConfig:
    """Non-null ``dataset.*`` leaves of the command merged over the run's; a new root also
    moves the splits of a resolved (checkpoint) config that hold the old root literally."""
    if dataset is None:
        return run_cfg
    given = OmegaConf.to_container(OmegaConf.create(dict(dataset)), resolve=True)
    leaves = [(k, v) for k, v in _leaves(given, "dataset") if v is not None]
    if not leaves:
        return run_cfg
    cfg = run_cfg.copy()
    new_root = given.get("root")
    if new_root is not None:
        old_root = cfg.dataset.get("root")
        for split in ("train", "val"):
            node = cfg.dataset.get(split)
            if isinstance(node, DictConfig) and "root" in node and node.root == old_root:
                OmegaConf.update(cfg, f"dataset.{split}.root", new_root, merge=False)
    for key, value in leaves:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def check_schema(cfg: DictConfig, eval: bool = True, dataset: bool = False) -> None:
    """The schema of the sections the command sets over a saved run (``eval``, ``dataset``);
    what an older run saved and the command leaves alone is taken as it was trained."""
    if eval:
        config_schema.check(cfg.eval, config_schema.EvalSchema, "eval.")
    if dataset:
        config_schema.check(cfg.dataset, config_schema.DatasetSchema, "dataset.")


def open_run(run: str | Path, checkpoint: str = "best", *, eval: Mapping | None = None,
             eval_keys: Sequence[str] | None = None, dataset: Mapping | None = None,
             folder_only: bool = False) -> Run:
    """Open a saved run with the command's options.

    Args:
        run: a run folder, or a checkpoint file (its config: the run folder two levels up,
            else the copy stored in it) unless ``folder_only``.
        checkpoint: ``best`` (falls back to ``last``), ``last`` or a path to a .pt; for a run
            folder.
        eval: the command's eval config; None keeps the run's.
        eval_keys: None: ``eval`` replaces the run's eval; a list of dotted ``eval.*`` keys:
            the run's own eval is kept and only these keys are taken from ``eval`` (what
            ``segtrain.evaluate`` does when no ``eval=`` option is chosen).
        dataset: ``dataset.*`` options; non-null leaves are merged over the run's (the data
            moved, another split).
        folder_only: refuse a checkpoint file as ``run``.
    """
    path = Path(str(run)).expanduser()
    if path.is_file() and not folder_only:
        source = path
        folder = path.parent.parent
        run_dir = folder if (folder / ".hydra" / "config.yaml").is_file() else None
    else:
        run_dir = run_folder(path)
        source = checkpoint_path(run_dir, str(checkpoint))
    state = checkpoints.load(source, map_location="cpu")
    saved = saved_config(run_dir, state, source)
    with_eval = _with_eval(saved, eval, eval_keys)
    cfg = _with_dataset(with_eval, dataset)
    check_schema(cfg, eval=eval is not None, dataset=cfg is not with_eval)
    log.info("checkpoint %s (iteration %s)", source, state.get("iteration", "?"))
    return Run(run_dir, source, state, cfg)


def with_eval(config: DictConfig, eval: Mapping) -> DictConfig:
    """A run's config with ``eval`` in place of its eval, schema-checked."""
    cfg = _with_eval(config, eval, None)
    check_schema(cfg)
    return cfg


# -- the model -----------------------------------------------------------------------------
def build_model(run: Run, device: torch.device, in_channels: int = 3) -> nn.Module:
    """The run's model with the checkpoint's weights, in eval mode on ``device``."""
    # every weight comes from the checkpoint: fetching ImageNet weights again would be
    # wasted time, and fails offline or when the file has moved since training
    cfg = run.config
    if "pretrained" in cfg.model:
        cfg = OmegaConf.merge(cfg, {"model": {"pretrained": None}})
    # RGB-D runs (SUN RGB-D use_depth=true) need a 4-channel stem; RGB models keep the
    # constructor's default so families without an in_channels argument still build
    model = build_network(cfg, in_channels)
    # a trainer.ema run's last.pt: the weight average, not the weights to resume from
    checkpoints.load_model_state(model, checkpoints.inference_weights(run.state), run.checkpoint)
    return model.to(device).eval()
