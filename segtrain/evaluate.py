"""Evaluation entry point: score a trained run on its validation split.

    python -m segtrain.evaluate run=outputs/<run>                    # the run's own eval, best.pt
    python -m segtrain.evaluate run=outputs/<run> eval=msc_crf       # MSC max fusion + dense CRF
    python -m segtrain.evaluate run=outputs/<run> eval=slide checkpoint=last
    python -m segtrain.evaluate run=outputs/<run> eval=msc eval.output_stride=8  # DeepLab v3
    python -m segtrain.evaluate run=outputs/<run> dataset.root=/data/VOCdevkit dataset.val.split=val
    python -m segtrain.evaluate -m run=outputs/<run> eval=whole,msc,msc_crf   # one table each
    torchrun --nproc_per_node=4 -m segtrain.evaluate run=outputs/<run> eval=msc_crf  # 4 ranks

The run is opened by the run layer (``segtrain.runs.open_run``): its config
(``<run>/.hydra/config.yaml``, else the resolved copy stored in its checkpoint), with the
command's options and the config schema applied, rebuilds the validation set and the model
exactly as training did. Without an ``eval=`` option the run's own eval config is used (its
metrics.json scores are reproduced; ``eval.*`` keys given here are set over it); an ``eval``
option chosen here replaces the run's, and ``dataset.*`` keys given here are merged over the
run's (the data moved, another split). Prints the per-class table and writes
``<run>/eval_<name>.json`` (scores, confusion matrix, the eval config and the command's
``eval.*`` overrides) and ``<run>/eval_<name>_samples.png`` (image | ground truth |
prediction); with ``eval.save_per_image=true`` also ``<run>/eval_<name>_per_image.npz``
(``segtrain.eval.per_image``, what scripts/compare_runs.py reads); with
``eval.dump_worst=N`` the N images of lowest per-image mIoU as panels in
``<run>/eval_<name>_worst/``. ``<name>`` is ``name=`` if given, else the eval option's name
with ``_os<N>`` when ``eval.output_stride`` is set, so OS 16 and OS 8 results of one option
do not overwrite each other (``name=msc_crf_searched`` for a CRF with other values). The
file names the checkpoint it scored: ``eval_<name>`` is the run's ``best.pt``; another of the run's
checkpoints adds its stem (``eval_whole_last.json``), a checkpoint from elsewhere its stem
and a hash of its path, so it never replaces the run's own results. Hydra's own log of
this call goes to ``<run>/eval/<time>_<eval>/``, so evaluation leaves ``outputs/`` alone.

Under torchrun (or SLURM tasks) each rank scores every W-th image, the confusion matrices
are summed across ranks, and rank 0 prints and writes: the scores equal one process's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from segtrain import app, runs
from segtrain.app import build_evaluator, palette_of, pick_device
from segtrain.cli import user_errors
from segtrain.core import distributed
from segtrain.core.json_files import write_json
from segtrain.errors import ConfigError
from segtrain.eval import per_image
from segtrain.eval.metrics import SUMMARY_METRICS, format_table, percent
from segtrain.runs import RunError
from segtrain.viz import comparison_strip, write_worst

__all__ = ["RunError", "evaluate", "eval_overrides", "output_name", "result_file"]

log = logging.getLogger("segtrain")

# name=: one file-name component (no folder, no leading dot)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


# -- evaluation ----------------------------------------------------------------------------
def output_name(cfg: DictConfig, eval_name: str) -> str:
    """``name=``, else the eval option with ``_os<N>`` when ``eval.output_stride`` is set."""
    if cfg.get("name"):
        name = str(cfg.name)
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"name={name!r}: expected a file-name part of letters, digits "
                              f"and _ . + = - (the result is <run>/eval_<name>.json)")
        return name
    output_stride = cfg.eval.get("output_stride")
    return eval_name if output_stride is None else f"{eval_name}_os{output_stride}"


def result_file(run: runs.Run, name: str) -> str:
    """The result's file stem (``runs.evaluation_stem``: ``eval_<name>`` for the run's
    best.pt, ``eval_<name>_last`` for its last.pt, a hashed stem for a foreign checkpoint)."""
    return runs.evaluation_stem(run.folder, run.checkpoint, name)


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
    name = output_name(cfg, eval_name)  # a bad name= stops here, before any work
    run = runs.open_run(cfg.run, str(cfg.checkpoint), eval=cfg.eval,
                        eval_keys=list(overrides or {}) if keep_run_eval else None,
                        dataset=cfg.get("dataset"), folder_only=True)
    run_dir, run_cfg, state, path = run.folder, run.config, run.state, run.checkpoint
    dist = distributed.init()
    device = pick_device(cfg.device, dist.local_rank)
    val_set = app.build_val_set(run_cfg)
    model = runs.build_model(run, device, getattr(val_set, "in_channels", 3))
    # each rank a strided share of the images; Evaluator sums the confusion matrices
    evaluator = build_evaluator(run_cfg, val_set, dist, show_progress=dist.is_main,
                                num_workers=app.loader_workers(int(cfg.num_workers),
                                                               "num_workers"))
    log.info("evaluating %s on %s/%s (%d images), eval=%s, device %s", run_dir,
             run_cfg.dataset.name, getattr(val_set, "split", "val"), len(val_set), eval_name,
             device)
    scores = evaluator.run(model, device)  # at eval.precision, as the trainer's evaluation
    distributed.cleanup()
    result = {
        "run": str(run_dir), "checkpoint": str(path), "iteration": state.get("iteration"),
        "own_checkpoint": run.own_checkpoint, "eval": eval_name, "name": name,
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
    stem = result_file(run, name)
    out = run_dir / f"{stem}.json"
    write_json(result, out)
    if evaluator.per_image is not None:
        per_image.save(evaluator.per_image, list(val_set.class_names),
                       run_dir / f"{stem}_per_image.npz")
    palette = palette_of(val_set, run_cfg.dataset.num_classes)
    if evaluator.worst:
        write_worst(evaluator.worst, run_dir / f"{stem}_worst", palette,
                    run_cfg.dataset.ignore_index)
    if evaluator.samples:
        strip = comparison_strip(evaluator.samples, palette, run_cfg.dataset.ignore_index)
        Image.fromarray(np.ascontiguousarray(strip)).save(run_dir / f"{stem}_samples.png")
    log.info("eval=%s: %s -> %s", result["name"],
             "  ".join(f"{k} {percent(scores[k])}" for k in SUMMARY_METRICS), out)
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
