"""Evaluation entry point: score a trained run on its validation split.

    python -m segtrain.evaluate run=outputs/<run>                    # the run's own eval, best.pt
    python -m segtrain.evaluate run=outputs/<run> eval=msc_crf       # MSC max fusion + dense CRF
    python -m segtrain.evaluate run=outputs/<run> eval=slide checkpoint=last
    python -m segtrain.evaluate run=outputs/<run> eval=msc eval.output_stride=8  # DeepLab v3
    python -m segtrain.evaluate run=outputs/<run> dataset.root=/data/VOCdevkit dataset.val.split=val
    python -m segtrain.evaluate -m run=outputs/<run> eval=whole,msc,msc_crf   # one table each
    torchrun --nproc_per_node=4 -m segtrain.evaluate run=outputs/<run> eval=msc_crf  # 4 ranks

The run's config (``<run>/.hydra/config.yaml``, else the resolved copy stored in its
checkpoint) rebuilds the validation set and the model exactly as training did. Without an
``eval=`` option the run's own eval config is used (its metrics.json scores are reproduced;
``eval.*`` keys given here are set over it); an ``eval`` option chosen here replaces the
run's, and ``dataset.*`` keys given here are merged over the run's (the data moved, another
split). Prints the per-class table and writes
``<run>/eval_<name>.json`` (scores, confusion matrix, the eval config and the command's
``eval.*`` overrides) and ``<run>/eval_<name>_samples.png`` (image | ground truth |
prediction); with ``eval.save_per_image=true`` also ``<run>/eval_<name>_per_image.npz``
(``segtrain.eval.per_image``, what scripts/compare_runs.py reads); with
``eval.dump_worst=N`` the N images of lowest per-image mIoU as panels in
``<run>/eval_<name>_worst/``. ``<name>`` is ``name=``
if given, else the eval option's name with ``_os<N>`` when ``eval.output_stride`` is set,
so OS 16 and OS 8 results of one option do not overwrite each other
(``name=msc_crf_searched`` for a CRF with other values). Hydra's own log of this call
goes to ``<run>/eval/<time>_<eval>/``, so evaluation leaves ``outputs/`` alone.

Under torchrun (or SLURM tasks) each rank scores every W-th image, the confusion matrices
are summed across ranks, and rank 0 prints and writes: the scores equal one process's.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from segtrain import app
from segtrain.app import build_evaluator, palette_of, pick_device
from segtrain.cli import user_errors
from segtrain.core import checkpoint, distributed
from segtrain.core.json_files import write_json
from segtrain.errors import UserError
from segtrain.eval import per_image
from segtrain.eval.metrics import SUMMARY_METRICS, format_table
from segtrain.viz import comparison_strip, write_worst

log = logging.getLogger("segtrain")


class RunError(UserError):
    """The ``run=`` folder is missing or is not a training run (no config)."""


# -- the run: folder, checkpoint, config ---------------------------------------------------
def run_folder(run: str | Path) -> Path:
    path = Path(str(run)).expanduser()
    if not path.is_dir():
        raise RunError(f"run folder not found: {path} (run= takes a training run folder, "
                       f"e.g. outputs/<date>/<time>_<model>_<dataset>)")
    return path


def _hydra_folder_root(run: str) -> str:
    """``${segtrain.run:${run}}``, where hydra.run.dir starts (conf/evaluate.yaml, predict.yaml).

    Hydra creates its output folder before main() runs, so a mistyped ``run=`` would leave
    an empty folder tree behind. A run that does not exist gets a scratch folder instead,
    and main() then stops with the RunError message (raising here would bury it under a
    traceback of Hydra's interpolation machinery).
    """
    if Path(str(run)).expanduser().is_dir():
        return str(run)
    return str(Path(tempfile.gettempdir()) / "segtrain_missing_run")


OmegaConf.register_new_resolver("segtrain.run", _hydra_folder_root, replace=True)


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
        raise checkpoint.CheckpointError(
            f"checkpoint not found: the run {run_dir} has neither checkpoints/best.pt nor "
            f"checkpoints/last.pt (checkpoint=best|last|<path to a .pt>)")
    if choice == "last":
        return checkpoint.resolve(ckpts / "last.pt")
    return checkpoint.resolve(choice)


def run_config(run_dir: Path | None, state: dict[str, Any], source: Path) -> DictConfig:
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


def _leaves(node: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _leaves(v, f"{prefix}.{k}")]
    return [(prefix, node)]


def apply_overrides(run_cfg: DictConfig, cfg: DictConfig,
                    eval_keys: list[str] | None = None) -> DictConfig:
    """Replace the run's ``eval`` with this command's; merge non-null ``dataset.*`` keys.

    ``eval_keys``: keep the run's own ``eval`` (the one its training evaluation used, e.g. an
    experiment's ``eval.predictor.scales``) and set only these ``eval.*`` keys of the command
    over it: what ``segtrain.evaluate`` does when no ``eval=`` option is chosen."""
    if eval_keys is None:
        # replaced, not merged: whole.yaml over slide.yaml must not keep the slide crop
        run_cfg.eval = cfg.eval
    else:
        # a run older than an eval key (eval.precision) gets the command's value of it
        for key in cfg.eval:
            if key not in run_cfg.eval:
                run_cfg.eval[key] = cfg.eval[key]
        for key in eval_keys:
            OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), merge=False,
                             force_add=True)
    if cfg.get("dataset") is None:  # segtrain.predict reads no dataset
        return run_cfg
    new_root = cfg.dataset.get("root")
    if new_root is not None:
        old_root = run_cfg.dataset.get("root")
        # a config taken from a checkpoint is resolved: its splits hold the old root
        # literally instead of ${dataset.root}, so they follow the new root by hand
        for split in ("train", "val"):
            node = run_cfg.dataset.get(split)
            if isinstance(node, DictConfig) and "root" in node and node.root == old_root:
                node.root = new_root
    given = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key, value in _leaves(given, "dataset"):
        if value is not None:
            OmegaConf.update(run_cfg, key, value, merge=False, force_add=True)
    return run_cfg


def load_run(cfg: DictConfig, eval_keys: list[str] | None = None,
             ) -> tuple[Path, DictConfig, dict[str, Any], Path]:
    """(run folder, its config with this command's overrides, checkpoint state and path);
    ``eval_keys``: see ``apply_overrides``."""
    run_dir = run_folder(cfg.run)
    path = checkpoint_path(run_dir, str(cfg.checkpoint))
    state = checkpoint.load(path, map_location="cpu")
    run_cfg = apply_overrides(run_config(run_dir, state, path), cfg, eval_keys)
    log.info("checkpoint %s (iteration %s)", path, state.get("iteration", "?"))
    return run_dir, run_cfg, state, path


# -- building from the run config ----------------------------------------------------------
def build_model(run_cfg: DictConfig, state: dict[str, Any], device: torch.device,
                in_channels: int = 3, source: str | Path = "the checkpoint") -> nn.Module:
    """The run's model with the checkpoint's weights, in eval mode on ``device``."""
    model_cfg = run_cfg.model.copy()
    if "pretrained" in model_cfg:
        # every weight comes from the checkpoint: fetching ImageNet weights again would be
        # wasted time, and fails offline or when the file has moved since training
        model_cfg.pretrained = None
    # RGB-D runs (SUN RGB-D use_depth=true) need a 4-channel stem; RGB models keep the
    # constructor's default so families without an in_channels argument still build
    model = app.build_model(OmegaConf.merge(run_cfg, {"model": model_cfg}), in_channels)
    checkpoint.load_model_state(model, checkpoint.inference_weights(state), source)
    return model.to(device).eval()


# -- evaluation ----------------------------------------------------------------------------
def output_name(cfg: DictConfig, eval_name: str) -> str:
    """``name=``, else the eval option with ``_os<N>`` when ``eval.output_stride`` is set."""
    if cfg.get("name"):
        return str(cfg.name)
    output_stride = cfg.eval.get("output_stride")
    return eval_name if output_stride is None else f"{eval_name}_os{output_stride}"


def eval_overrides(task_overrides: list[str]) -> dict[str, str]:
    """The ``eval.<key>=<value>`` overrides of the command line (not the option choice)."""
    pairs = (o.split("=", 1) for o in task_overrides if "=" in o)
    return {k.lstrip("+~"): v for k, v in pairs if k.lstrip("+~").startswith("eval.")}


def run_eval_choice(run: str | Path) -> str:
    """The ``eval`` option the run was trained with (its ``.hydra/hydra.yaml``), else
    ``run``."""
    hydra_yaml = Path(str(run)) / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        choice = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices.eval")
        if choice:
            return str(choice)
    return "run"


def evaluate(cfg: DictConfig, eval_name: str,
             overrides: dict[str, str] | None = None,
             keep_run_eval: bool = False) -> dict[str, Any]:
    """Score the run's checkpoint on its validation split with ``cfg.eval``.

    Args:
        cfg: the ``conf/evaluate.yaml`` config (run, checkpoint, device, eval, dataset...).
        eval_name: the ``eval`` option's name.
        overrides: the command's ``eval.*`` overrides, recorded in the result (what
            scripts/ablation_table.py and scripts/inference_table.py show).
        keep_run_eval: score with the run's own ``eval`` config (the one behind its
            metrics.json) and only ``overrides`` set over it; the command line's default when
            it chooses no ``eval=`` option.
    """
    dist = distributed.init()
    run_dir, run_cfg, state, path = load_run(
        cfg, list(overrides or {}) if keep_run_eval else None)
    run_cfg.trainer.num_workers = cfg.num_workers  # build_evaluator reads it from there
    device = pick_device(cfg.device, dist.local_rank)
    val_set = app.build_val_set(run_cfg)
    model = build_model(run_cfg, state, device, getattr(val_set, "in_channels", 3), path)
    # each rank a strided share of the images; Evaluator sums the confusion matrices
    evaluator = build_evaluator(run_cfg, val_set, dist, show_progress=dist.is_main)
    log.info("evaluating %s on %s/%s (%d images), eval=%s, device %s", run_dir,
             run_cfg.dataset.name, getattr(val_set, "split", "val"), len(val_set), eval_name,
             device)
    scores = evaluator.run(model, device)  # at eval.precision, as the trainer's evaluation
    distributed.cleanup()
    result = {
        "run": str(run_dir), "checkpoint": str(path), "iteration": state.get("iteration"),
        "eval": eval_name, "name": output_name(cfg, eval_name),
        "overrides": dict(overrides or {}),
        "eval_config": OmegaConf.to_container(run_cfg.eval, resolve=True),
        "dataset": run_cfg.dataset.name, "split": getattr(val_set, "split", None),
        "num_images": len(val_set), "world_size": dist.world_size,
        "class_names": list(val_set.class_names), **scores,
    }
    if not dist.is_main:
        return result

    table = format_table(scores, val_set.class_names)
    print(table, flush=True)
    out = run_dir / f"eval_{result['name']}.json"
    write_json(result, out)
    if evaluator.per_image is not None:
        per_image.save(evaluator.per_image, list(val_set.class_names),
                       run_dir / f"eval_{result['name']}_per_image.npz")
    palette = palette_of(val_set, run_cfg.dataset.num_classes)
    if evaluator.worst:
        write_worst(evaluator.worst, run_dir / f"eval_{result['name']}_worst", palette,
                    run_cfg.dataset.ignore_index)
    if evaluator.samples:
        strip = comparison_strip(evaluator.samples, palette, run_cfg.dataset.ignore_index)
        Image.fromarray(np.ascontiguousarray(strip)).save(
            run_dir / f"eval_{result['name']}_samples.png")
    log.info("eval=%s: %s -> %s", result["name"],
             "  ".join(f"{k} {scores[k]:.4f}" for k in SUMMARY_METRICS), out)
    return result


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    with user_errors():
        hydra_cfg = HydraConfig.get()
        task = list(hydra_cfg.overrides.task)
        # no eval= option chosen: the run's own eval config, as its training evaluation used
        chosen = any(o.split("=", 1)[0].lstrip("+~") == "eval" for o in task)
        name = hydra_cfg.runtime.choices["eval"] if chosen else run_eval_choice(cfg.run)
        result = evaluate(cfg, name, eval_overrides(task), keep_run_eval=not chosen)
    return result["miou"]  # what a sweeper over eval options compares


if __name__ == "__main__":
    main()
