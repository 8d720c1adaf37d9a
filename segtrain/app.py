"""The one module that reads the config: it builds dataset, model, loss, optimizer, schedule,
trainer and evaluator from ``cfg`` with ``hydra.utils.instantiate`` and runs them. Every
other module takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from segtrain import config_schema
from segtrain.builders import build_model, instantiate
from segtrain.core import checkpoint, distributed
from segtrain.core.precision import resolve_precision
from segtrain.core.rng import seed_everything, stream_seed
from segtrain.data.base import DatasetError, SegmentationDataset
from segtrain.data.class_uniform import ClassUniformPlan, class_uniform_plan
from segtrain.data.loader import eval_loader, train_loader
from segtrain.data.transforms import compose
from segtrain.engine.batch import Batch, resolve_batch
from segtrain.engine.callbacks.evaluation import PeriodicEvaluation
from segtrain.engine.callbacks.preemption import Preemption
from segtrain.engine.callbacks.run_log import RunLog
from segtrain.engine.checkpoint_files import check_disk, disk_plan
from segtrain.engine.trainer import FINISHED, Trainer
from segtrain.errors import ConfigError
from segtrain.eval.evaluator import Evaluator
from segtrain.eval.inference import Inference
from segtrain.eval.metrics import percent
from segtrain.models.base import SegmentationModel
from segtrain.models.param_groups import Paramwise, optimizer_groups
from segtrain.viz import default_palette

log = logging.getLogger("segtrain")


CONF_DIR = Path(__file__).resolve().parent / "conf"  # conf/, installed as segtrain/conf


def dataset_config(overrides: list[str]) -> DictConfig:
    """Compose only the dataset group: ``dataset=<name>`` plus ``dataset.*`` overrides."""
    names = [o for o in overrides if o.startswith("dataset=")]
    if not names:
        raise SystemExit("usage: dataset=<name> dataset.root=<path> [dataset.key=value ...]")
    rest = [o for o in overrides if not o.startswith("dataset=")]
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose(overrides=["+" + names[-1]] + rest).dataset


def loader_workers(requested: int, key: str = "trainer.num_workers") -> int:
    """``requested`` data-loader worker processes, at most this rank's share of the cores
    (``distributed.cores_per_rank``): more only contend for them, and torch's DataLoader
    warns about it; one info line when capped."""
    workers = min(int(requested), distributed.cores_per_rank())
    if workers < requested:
        log.info("data loader: %d worker process%s, not %s=%d: this process may use %d "
                 "core(s)", workers, "" if workers == 1 else "es", key, requested,
                 distributed.cores_per_rank())
    return workers


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available on this machine")
    return device


def _build_split(cfg: DictConfig, split: str, **item_options: bool) -> Any:
    """``dataset.<split>`` with its pipeline ``dataset.<split>_transforms`` and the items'
    extra keys (``keep_rgb``, ``keep_rows``)."""
    pipeline = compose(instantiate(cfg.dataset[f"{split}_transforms"]))
    ds = instantiate(cfg.dataset[split], transforms=pipeline, **item_options)
    if ds.num_classes != cfg.dataset.num_classes:
        raise ConfigError(f"dataset.num_classes={cfg.dataset.num_classes} but the {split} "
                         f"dataset {type(ds).__name__} has {ds.num_classes} classes")
    if ds.ignore_index != cfg.dataset.ignore_index or ds.ignore_index < ds.num_classes:
        raise ConfigError(f"dataset.ignore_index={cfg.dataset.ignore_index}: the {split} "
                         f"dataset {type(ds).__name__} labels void pixels {ds.ignore_index}; "
                         f"expected dataset.{split}.ignore_index=${{dataset.ignore_index}} and "
                         f"a value outside its classes 0..{ds.num_classes - 1}")
    return ds


def build_train_set(cfg: DictConfig) -> Any:
    """The training set; with ``dataset.source_rows: true`` its items carry ``"rows"``, each
    pixel's row in the full image (``segtrain.data.source_rows``), for HANet."""
    return _build_split(cfg, "train", keep_rows=bool(cfg.dataset.get("source_rows", False)))


def build_sampling(cfg: DictConfig, train_set: Any, num_workers: int | None = None
                   ) -> ClassUniformPlan | None:
    """``dataset.class_uniform`` (``segtrain.data.class_uniform``): the plan of class-uniform
    sampling over ``train_set``, its class index read from the cache or built (by
    ``num_workers`` processes; None: ``trainer.num_workers``); None: off (also where a saved
    config predates the key)."""
    options = cfg.dataset.get("class_uniform")
    if not options or not options.pct:
        return None
    workers = cfg.trainer.num_workers if num_workers is None else num_workers
    return class_uniform_plan(train_set, float(options.pct), int(options.tile), workers)


def check_first_samples(splits: dict[str, SegmentationDataset]) -> None:
    """Read the first sample of every split (``load_checked``: sizes, label values) before
    the first step, so that a broken validation split is not found after training; one line
    naming the split. ``scripts/check_dataset.py`` reads every file."""
    for split, dataset in splits.items():
        try:
            dataset.load_checked(0)
        except DatasetError as err:
            raise DatasetError(f"dataset.{split}: its first sample: {err} (checked before the "
                               f"first step; scripts/check_dataset.py checks every file)"
                               ) from None


def build_val_set(cfg: DictConfig) -> Any:
    """The evaluation set; its items carry the image as read (``"rgb"``) for the CRF and
    the figures."""
    return _build_split(cfg, "val", keep_rgb=True)


def _model_class(path: Path) -> type:
    """The ``_target_`` class of a conf/model file, following a defaults list to its base."""
    node = OmegaConf.load(path)
    if "_target_" in node:
        return hydra.utils.get_class(node._target_)
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            return _model_class(path.parent / f"{entry}.yaml")
    raise ConfigError(f"{path} names no _target_")


def models_that_fit(required: frozenset[str]) -> list[str]:
    """conf/model options whose class can return (``TRAIN_KEYS``) every key in ``required``."""
    classes = {path.stem: _model_class(path)
               for path in sorted((CONF_DIR / "model").glob("*.yaml"))}
    return [name for name, cls in classes.items()
            if issubclass(cls, SegmentationModel) and required <= cls.TRAIN_KEYS]


def _choice(cfg: DictConfig, group: str) -> str:
    """``group=<option>`` as the user chose it, else ``group=<_target_>``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        option = HydraConfig.get().runtime.choices.get(group)
        if option:
            return f"{group}={option}"
    return f"{group}={cfg[group]._target_}"


def check_outputs(cfg: DictConfig, model: torch.nn.Module, loss_fn: Any) -> None:
    """Refuse at start-up a loss that needs outputs the model does not return in training."""
    missing = loss_fn.required_keys - model.train_keys
    if missing:
        fit = models_that_fit(loss_fn.required_keys)
        raise ConfigError(
            f"{_choice(cfg, 'model')} does not return {', '.join(sorted(missing))}, which "
            f"{_choice(cfg, 'loss')} needs; models that fit: {', '.join(fit) or 'none'}")


def check_takes_rows(cfg: DictConfig, model: torch.nn.Module) -> None:
    """Refuse ``dataset.source_rows: true`` for a model whose forward takes no ``rows``."""
    if cfg.dataset.get("source_rows", False) and not model.TAKES_ROWS:
        raise ConfigError(
            f"dataset.source_rows=true: {_choice(cfg, 'model')} ({type(model).__name__}) "
            f"takes no rows (only models with TAKES_ROWS, HANet, do; a multi-scale-input "
            f"wrapper does not); set dataset.source_rows=false")


def class_weights(cfg: DictConfig) -> list[float] | None:
    """``loss.class_weights``: null, an explicit list, or ``median_freq``."""
    weights = cfg.loss.get("class_weights")
    if weights is None:
        return None
    if isinstance(weights, str):
        if weights != "median_freq":
            raise ConfigError(f"loss.class_weights must be null, a list or 'median_freq', "
                             f"got {weights!r}")
        from segtrain.data.stats import load_or_compute_class_weights

        plain = instantiate(cfg.dataset.train, transforms=None)
        return list(load_or_compute_class_weights(plain))
    weights = [float(w) for w in weights]
    if len(weights) != cfg.dataset.num_classes:
        raise ConfigError(f"loss.class_weights has {len(weights)} values, expected "
                         f"dataset.num_classes={cfg.dataset.num_classes}")
    return weights


def param_groups(cfg: DictConfig, model: SegmentationModel) -> list[dict]:
    """The optimizer groups of ``model``'s parameter roles (``head_modules``) under the
    policy ``optim.paramwise`` (conf/optim/paramwise/, segtrain/models/param_groups.py),
    each with its ``lr_mult`` and ``weight_decay_mult``. With ``build_optimizer`` the one
    route from a config and a model to the optimizer training steps."""
    policy = Paramwise.from_mapping(cfg.optim.paramwise)
    return optimizer_groups(model, model.head_modules(), policy)


def build_optimizer(cfg: DictConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """``cfg.optim`` over ``groups`` (``param_groups``): each group's lr and weight decay
    are ``optim.lr`` and ``optim.weight_decay`` times its multipliers."""
    base_lr = float(cfg.optim.lr)
    base_wd = float(cfg.optim.weight_decay)
    groups = [{**g, "lr": base_lr * g.get("lr_mult", 1.0),
               "weight_decay": base_wd * g.get("weight_decay_mult", 1.0)} for g in groups]
    node = OmegaConf.to_container(cfg.optim, resolve=True)
    node.pop("paramwise")  # the groups' multipliers above, not an optimizer argument
    return instantiate(node)(groups)


def train_batch(cfg: DictConfig, world_size: int) -> Batch:
    """The batch of one optimizer step on ``world_size`` ranks (``segtrain.engine.batch``)."""
    t = cfg.trainer
    return resolve_batch(t.batch_size, t.global_batch_size, int(t.iter_size), world_size)


def build_inference(cfg: DictConfig) -> Inference:
    """``cfg.eval``: predictor, optional dense CRF, ``eval.precision`` and
    ``eval.output_stride`` (null: as trained); the one test-time path of the evaluator,
    ``segtrain.predict``, scripts/crf_search.py and ``segtrain.load_run``."""
    predictor = instantiate(cfg.eval.predictor)
    check_single_pyramid((cfg.model.get("msc") or {}).get("train_scales"), predictor)
    crf = instantiate(cfg.eval.crf) if cfg.eval.get("crf") else None
    return Inference(predictor, crf, precision=cfg.eval.precision,
                     output_stride=cfg.eval.get("output_stride"))


def build_evaluator(cfg: DictConfig, val_set, dist: distributed.DistInfo,
                    show_progress: bool = False, num_workers: int | None = None) -> Evaluator:
    """``cfg.eval``'s inference on ``val_set`` (this rank's share), the CRF in
    ``eval.crf_workers`` processes; ``num_workers`` loader workers (None: the run's
    ``trainer.num_workers``, capped by ``loader_workers``)."""
    workers = loader_workers(cfg.trainer.num_workers) if num_workers is None else num_workers
    return Evaluator(eval_loader(val_set, workers, dist.rank, dist.world_size),
                     cfg.dataset.num_classes, cfg.dataset.ignore_index, val_set.class_names,
                     build_inference(cfg), num_samples=cfg.eval.num_samples,
                     show_progress=show_progress, crf_workers=cfg.eval.get("crf_workers"),
                     per_image=bool(cfg.eval.get("save_per_image", False)),
                     dump_worst=int(cfg.eval.get("dump_worst", 0)))


def check_single_pyramid(train_scales, predictor) -> None:
    """A network trained with ``model.msc.train_scales`` already runs and max-fuses its
    pyramid in every forward pass (DeepLab v2 MSC: its test is eval=whole); a multi-scale
    predictor on top would run the whole pyramid at each of its scales."""
    if train_scales is None or len(predictor.scales) == 1:
        return
    scales, pyramid = list(train_scales), list(predictor.scales)
    raise ConfigError(
        f"model.msc.train_scales={scales} already fuses these scales inside the network, so "
        f"eval.predictor.scales={pyramid} would run the pyramid twice "
        f"({len(scales) * len(pyramid)} forward passes per image); evaluate with "
        f"eval.predictor.scales=[1.0] (eval=whole, or e.g. eval=msc_crf "
        f"eval.predictor.scales=[1.0])")


def palette_of(dataset, num_classes: int):
    palette = getattr(dataset, "palette", None)
    return palette if palette is not None and len(palette) >= num_classes else \
        default_palette(num_classes)


def check_batch_fits(cfg: DictConfig, batch: Batch, train_images: int) -> None:
    """Refuse a per-rank batch that one rank's share of the training split cannot fill
    (the loader drops incomplete batches: it would never yield one)."""
    share = train_images // batch.world_size
    if batch.per_rank > share:
        t = cfg.trainer
        key = "trainer.batch_size" if t.global_batch_size is None else \
            "trainer.global_batch_size"
        raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: {batch.per_rank} images per "
                          f"rank and micro-batch, but the training split has {train_images} "
                          f"images ({share} per rank on {batch.world_size} rank(s)); lower "
                          f"{key}")


def tracker(cfg: DictConfig, class_names, palette) -> list:
    """``logger.callback`` (``logger=mlflow``...), or none (``logger=tensorboard``: RunLog
    writes TensorBoard for every run). A sweep's jobs share one experiment: the sweep
    folder."""
    node = (cfg.get("logger") or {}).get("callback")
    if not node:
        return []
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    experiment = node.get("experiment")
    if experiment is None:
        experiment = "segtrain"
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            experiment = str(Path(HydraConfig.get().sweep.dir).resolve())
    # a partial: the config and palette are passed as they are, not merged into Hydra's node
    build = instantiate(node, _partial_=True)
    return [build(experiment=experiment, params=OmegaConf.to_container(cfg, resolve=True),
                  class_names=list(class_names), palette=palette,
                  ignore_index=cfg.dataset.ignore_index)]


def trial_pruning(cfg: DictConfig, dist: distributed.DistInfo) -> list:
    """A trial of ``hydra/sweeper=optuna_miou`` (``optuna_trial``, which the sweeper sets for
    its jobs): its evaluations reported to the trial in the study on disk, whose pruner may
    end the run (rank 0 talks to the study; the others follow its decision)."""
    number = cfg.get("optuna_trial")
    if number is None:
        return []
    from hydra.core.hydra_config import HydraConfig

    from segtrain.engine.callbacks.trial_pruning import TrialPruning
    from segtrain.sweeper import open_trial

    sweeper = HydraConfig.get().sweeper if HydraConfig.initialized() else OmegaConf.create()
    return [TrialPruning(open_trial(number, sweeper) if dist.is_main else None)]


def resume_source(resume: str | None, run_dir: Path) -> str | Path | None:
    """``auto`` resumes this run folder's last.pt when it exists (a requeued SLURM job)."""
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    return checkpoint.resolve(resume)


@dataclasses.dataclass
class Training:
    """What ``train`` trains: built from the config by ``build_training``."""

    model: torch.nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    lr_factor: Callable[[int], float]  # iteration -> multiplier of every group's rate
    batch: Batch  # of one optimizer step (segtrain.engine.batch)


def build_training(cfg: DictConfig, in_channels: int = 3, batch: Batch | None = None
                   ) -> Training:
    """The model (weights seeded by ``cfg.seed``, ``model.init_from`` applied), loss,
    optimizer, schedule and batch (``train_batch``; default: one rank) of a run, checked
    against each other (model and loss outputs, source rows); built on the current default
    device (``torch.device("meta")`` builds any experiment without memory)."""
    t = cfg.trainer
    batch = train_batch(cfg, 1) if batch is None else batch
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = build_model(cfg, in_channels, initialise=True)
    loss_fn = instantiate(cfg.loss, class_weights=class_weights(cfg))
    check_outputs(cfg, model, loss_fn)
    check_takes_rows(cfg, model)
    optimizer = build_optimizer(cfg, param_groups(cfg, model))
    lr_factor = instantiate(cfg.lr)(max_iters=t.max_iters)
    return Training(model, loss_fn, optimizer, lr_factor, batch)


def build_trainer(cfg: DictConfig, training: Training, batches: Callable[[int], Any],
                  run_dir: Path, device: torch.device, dist: distributed.DistInfo,
                  callbacks: list, class_names: list[str] | tuple[str, ...] = ()) -> Trainer:
    """The loop over ``batches`` (``start -> stream``) with ``cfg.trainer``'s settings;
    ``training.model`` as it will run (on ``device``, wrapped for DDP where needed);
    ``class_names`` of the dataset, for metrics.json."""
    t = cfg.trainer
    # what a resumed run must share with the checkpoint, or its poly curve bends
    schedule = {"trainer.max_iters": int(t.max_iters),
                "lr": OmegaConf.to_container(cfg.lr, resolve=True),
                "optim.lr": float(cfg.optim.lr),
                "images per step": training.batch.images_per_step}
    return Trainer(
        training.model, training.loss_fn, training.optimizer, training.lr_factor, batches,
        run_dir, max_iters=t.max_iters, iter_size=t.iter_size, precision=t.precision,
        clip_grad_norm=t.clip_grad_norm, log_interval=t.log_interval, seed=cfg.seed,
        device=device, callbacks=callbacks, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        dist=dist, compile=t.compile, channels_last=t.channels_last, schedule=schedule,
        allow_schedule_change=bool(t.resume_allow_schedule_change), ema_decay=t.ema.decay,
        checkpoint_interval=t.checkpoint_interval, keep_checkpoints=t.keep_checkpoints,
        class_names=class_names)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Build everything from ``cfg`` and train; returns the last validation scores with
    ``status`` (``Trainer.fit``'s: finished, stopped or pruned), ``finished`` and ``stop_signal``
    (the signal that stopped it, or None)."""
    config_schema.check(cfg, strict=True)  # a wrong key, type or range: one line, nothing built
    run_dir = Path(run_dir)
    dist = distributed.init()
    if dist.is_main:  # the first line: where to look while it runs
        log.info("run folder: %s", run_dir.resolve())
    seed_everything(cfg.seed + dist.rank, cfg.trainer.deterministic)
    device = pick_device(cfg.trainer.device, dist.local_rank)
    batch = train_batch(cfg, dist.world_size)  # a batch that cannot be: refused before the data

    train_set, val_set = build_train_set(cfg), build_val_set(cfg)
    check_batch_fits(cfg, batch, len(train_set))  # before any batch is allocated
    check_first_samples({"train": train_set, "val": val_set})
    log.info("data: %s train %d / val %d images, %d classes", cfg.dataset.name,
             len(train_set), len(val_set), cfg.dataset.num_classes)
    training = build_training(cfg, getattr(train_set, "in_channels", 3), batch)
    model, loss_fn = training.model, training.loss_fn
    model.to(device)  # the optimizer's parameters are these, moved in place
    loss_fn.to(device)
    if dist.enabled:
        if cfg.trainer.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        training = dataclasses.replace(training, model=model)  # what the loop runs
    # from here on each rank draws its own stream (dropout masks), a function of seed and rank
    seed_everything(stream_seed(cfg.seed, dist.rank))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters, device %s, precision %s", cfg.model._target_,
             n_params / 1e6, device, resolve_precision(cfg.trainer.precision, device))

    workers = loader_workers(cfg.trainer.num_workers)  # at most this rank's cores
    evaluator = build_evaluator(cfg, val_set, dist, num_workers=workers)
    evaluator.check_model(model)  # eval.output_stride: refused now, not at the first eval

    t = cfg.trainer
    batch_size = training.batch.per_rank
    log.info("batch: %d images per step = %d per rank x trainer.iter_size %d x %d rank(s)",
             training.batch.images_per_step, batch_size, t.iter_size, dist.world_size)
    # the endless, resumable sample stream; the trainer starts it at its own iteration
    batches = functools.partial(train_loader, train_set, batch_size, workers, cfg.seed,
                                rank=dist.rank, world_size=dist.world_size,
                                pin_memory=device.type == "cuda",
                                class_uniform=build_sampling(cfg, train_set, workers))
    palette = palette_of(val_set, cfg.dataset.num_classes)
    callbacks = [PeriodicEvaluation(evaluator, t.eval_interval),
                 RunLog(val_set.class_names, palette, cfg.dataset.ignore_index),
                 *tracker(cfg, val_set.class_names, palette), *trial_pruning(cfg, dist),
                 Preemption()]
    trainer = build_trainer(cfg, training, batches, run_dir, device, dist, callbacks,
                            val_set.class_names)
    source = resume_source(t.resume, run_dir)
    if source is not None:
        trainer.load_state_dict(checkpoint.load(source), checkpoint.resolve(source))
        log.info("resumed from %s at iteration %d", checkpoint.resolve(source), trainer.iteration)
    # what the checkpoints take, from the weights and the optimizer state (as resumed)
    plan = disk_plan(run_dir, trainer.bare_model, training.optimizer,
                     None if trainer.ema is None else trainer.ema.module, t.keep_checkpoints)
    if dist.is_main:
        log.info("%s", plan.text(run_dir))
    check_disk(plan, run_dir)
    status = trainer.fit()
    metrics = {**trainer.scores, "status": status, "finished": status == FINISHED,
               "stop_signal": trainer.stop.signal}
    best = trainer.record.best
    if dist.is_main and status == FINISHED and "miou" in metrics and best is not None:
        log.info("final: mIoU %s  pixel acc %s  (best mIoU %s)  run folder %s",
                 percent(metrics["miou"]), percent(metrics["pixel_acc"]),
                 percent(best["miou"]), run_dir)
    distributed.cleanup()
    return metrics

