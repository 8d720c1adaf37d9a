"""The typed schema of a run's config, checked once before anything is built.

Hydra composes whatever the YAML and the command line say; this module says which values
can work. Each config group is a dataclass whose fields carry the type and the allowed
range of one key; ``check(tree)`` walks the config (``app.py`` passes the composed
``DictConfig``; plain dicts and lists work as well), resolving only the keys it checks, and
raises a ``ConfigError`` whose one line names the key, the value
and what is allowed::

    error: trainer.max_iters='abc': expected an integer >= 1

A field marked ``optional`` may be absent (a key only some options of a group have, like
``lr.power`` of the poly schedule or ``model.output_stride`` of dilated networks); every
other field must be present, so a key the code reads always exists in the configs.

A key an experiment cannot run without, although the group gives it a default (FCN-16s
starts from a trained FCN-32s: ``model.init_from``), is ``${segtrain.required:}``: a plain
``???`` there would not replace the default (OmegaConf keeps a value when merging ``???``
onto it), while this interpolation resolves to ``???``, which the check refuses unless the
command line sets the key.
Groups whose options differ widely (``model``, ``loss``) are checked on the keys they
share; their constructors check the rest.

``check(cfg, strict=True)`` (a training start) also refuses a key nothing reads: one that a
``+key=value`` added to a group of keys the schema lists in full (``trainer``, ``eval``, the
top level...), naming the nearest existing key. A node with a ``_target_`` takes extra keys
(``+optim.eps=1e-8``: its constructor's argument, which refuses what it does not take), and
so does ``dataset`` (each data set has its own)::

    error: trainer.max_iter=10: no such key; the nearest existing key: trainer.max_iters
"""

from __future__ import annotations

import difflib
import math
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from segtrain.core.precision import PRECISIONS
from segtrain.errors import ConfigError
from segtrain.eval.inference import FUSIONS, PREDICTOR_MODES

OUTPUT_STRIDES = (8, 16, 32)


def spec(low: float | None = None, high: float | None = None, *, open_low: bool = False,
         open_high: bool = False, choices: tuple | None = None, optional: bool = False,
         pattern: str | None = None, empty_ok: bool = False, allowed: str | None = None,
         length: int | None = None, unset: str | None = None):
    """A schema field: ``low``/``high`` bound a number (inclusive unless ``open_*``),
    ``choices`` lists the allowed values, ``pattern`` a regular expression a string must
    match (``allowed`` says it in words), ``optional`` lets the key be absent, ``empty_ok`` a
    list be empty, ``length`` fixes a list's length; ``unset`` is the message when it is
    ``???`` (``{name}``: the name of its group, e.g. the dataset's)."""
    return field(metadata={"low": low, "high": high, "open_low": open_low,
                           "open_high": open_high, "choices": choices,
                           "optional": optional, "pattern": pattern,
                           "empty_ok": empty_ok, "allowed": allowed, "length": length,
                           "unset": unset})


UNSET = "???"
# ${segtrain.required:}: an unset value that survives the merge onto a group's default
OmegaConf.register_new_resolver("segtrain.required", lambda: UNSET, replace=True)


@dataclass
class EMASchema:
    decay: float | None = spec(0, 1, open_high=True)


@dataclass
class TrainerSchema:
    max_iters: int = spec(1)
    batch_size: int | None = spec(1)
    global_batch_size: int | None = spec(1)
    iter_size: int = spec(1)
    num_workers: int = spec(0)
    precision: str = spec(choices=PRECISIONS)
    clip_grad_norm: float | None = spec(0, open_low=True)
    eval_interval: int = spec(1)
    log_interval: int = spec(1)
    checkpoint_interval: int = spec(1)
    keep_checkpoints: int = spec(0, optional=True)  # absent (older runs): 0
    deterministic: bool = spec()
    device: str = spec(pattern=r"auto|cpu|cuda(:\d+)?|mps",
                       allowed="auto, cpu, cuda, cuda:N or mps")
    sync_bn: bool = spec()
    compile: bool = spec()
    channels_last: bool = spec()
    resume: str | None = spec()
    resume_allow_schedule_change: bool = spec()
    ema: EMASchema = spec()


@dataclass
class ParamwiseSchema:
    """``optim.paramwise`` (``segtrain.models.param_groups.Paramwise``)."""
    head_lr_mult: float = spec(0)
    bias_lr_mult: float = spec(0)
    bias_decay_mult: float = spec(0)
    norm_lr_mult: float = spec(0)
    norm_weight_decay_mult: float = spec(0)
    norm_bias_decay_mult: float = spec(0)


@dataclass
class OptimSchema:
    paramwise: ParamwiseSchema = spec()
    lr: float = spec(0, open_low=True)
    weight_decay: float = spec(0)
    momentum: float = spec(0, 1, open_high=True, optional=True)
    betas: list[float] = spec(0, 1, open_high=True, optional=True)


@dataclass
class ScheduleSchema:
    power: float = spec(0, open_low=True, optional=True)
    gamma: float = spec(0, 1, open_low=True, optional=True)
    milestones: list[float] = spec(0, open_low=True, optional=True, empty_ok=True)
    warmup_iters: int = spec(0)
    warmup_ratio: float = spec(0, 1, open_low=True)


@dataclass
class MultiScaleSchema:
    train_scales: list[float] | None = spec(0, open_low=True)


@dataclass
class ModelSchema:
    output_stride: int = spec(choices=OUTPUT_STRIDES, optional=True)
    init_from: str | None = spec()
    msc: MultiScaleSchema = spec()


@dataclass
class AugmentSchema:
    """The knobs of ``segtrain.data.transforms.train_augmentation``."""
    scales: list[float] | None = spec(0, open_low=True)
    continuous_scale: bool = spec()
    rotate: float = spec(0, 180)
    elastic_std: float = spec(0)
    blur: float = spec(0, 1)
    crop_size: list[int] | None = spec(1, length=2)
    hflip: float = spec(0, 1)
    color_jitter: float = spec(0, 1)


@dataclass
class ClassUniformSchema:
    """``segtrain.data.class_uniform``: the share of centred crops and the index's tile."""
    pct: float | None = spec(0, 1)
    tile: int = spec(1)


@dataclass
class DatasetSchema:
    #: each data set has keys of its own (its splits, transforms, layout)
    OTHER_KEYS: ClassVar[bool] = True
    name: str = spec()
    # absent for the embedded data sets (synthetic); ??? for those on disk
    root: str = spec(optional=True, unset=(
        "dataset.root is not set: pass the folder the {name} data set is in, e.g. "
        "dataset.root=/data/{name} (its layout: conf/dataset/{name}.yaml; "
        "scripts/check_dataset.py checks it)"))
    image_size: int = spec(1, optional=True)  # the synthetic set's
    num_classes: int = spec(1)
    ignore_index: int = spec(0)
    num_workers: int = spec(0)
    mean: list[float] = spec(0, 1)
    std: list[float] = spec(0, open_low=True)
    crop_size: list[int] | None = spec(1, optional=True, length=2)
    augment: AugmentSchema = spec(optional=True)  # absent where a dataset lists its own steps
    source_rows: bool = spec(optional=True)  # absent: false
    class_uniform: ClassUniformSchema = spec(optional=True)  # absent (older runs): off


@dataclass
class PredictorSchema:
    mode: str = spec(choices=PREDICTOR_MODES)
    scales: list[float] = spec(0, open_low=True)
    fusion: str = spec(choices=FUSIONS)
    flip: bool = spec()


@dataclass
class EvalSchema:
    predictor: PredictorSchema = spec()
    output_stride: int | None = spec(choices=OUTPUT_STRIDES)
    precision: str = spec(choices=PRECISIONS)
    num_samples: int = spec(0)
    crf_workers: int | None = spec(0, optional=True)
    save_per_image: bool = spec(optional=True)  # absent (a run saved before it): false
    dump_worst: int = spec(0, optional=True)  # absent: 0
    crf: Any = spec(optional=True)  # null or the DenseCRF's node: its constructor checks it


@dataclass
class RunSchema:
    seed: int = spec(0)
    optuna_trial: int | None = spec(0, optional=True)  # absent (a run saved before it): none
    trainer: TrainerSchema = spec()
    optim: OptimSchema = spec()
    lr: ScheduleSchema = spec()
    model: ModelSchema = spec()
    dataset: DatasetSchema = spec()
    eval: EvalSchema = spec()
    loss: Any = spec()  # its constructor checks it
    logger: Any = spec(optional=True)


def check(tree: Mapping[str, Any], schema: type = RunSchema, prefix: str = "",
          strict: bool = False, root: Mapping[str, Any] | None = None) -> None:
    """Raise ``ConfigError`` naming the first key of ``tree`` that ``schema`` refuses;
    ``strict``: also a key that ``schema`` does not know where it lists every key
    (``root``: the whole config, whose keys the nearest one is sought among)."""
    hints = get_type_hints(schema)
    root = tree if root is None else root
    if strict and "_target_" not in tree.keys() and not getattr(schema, "OTHER_KEYS", False):
        known = {f.name for f in fields(schema)}
        for name in tree.keys():
            if name not in known:
                key = f"{prefix}{name}"
                raise unknown_key(key, _show(_plain(tree)[name]),
                                  [k for k in dotted_keys(root) if k != key
                                   and not k.startswith(key + ".")])
    for f in fields(schema):
        key = f"{prefix}{f.name}"
        if f.name not in tree.keys():  # a DictConfig's `in` is False for a ??? value
            if f.metadata["optional"]:
                continue
            raise ConfigError(f"{key} is missing from the config: expected "
                              f"{_expected(hints[f.name], f.metadata)}")
        try:
            value = tree[f.name]
        except MissingMandatoryValue:
            value = UNSET
        except InterpolationResolutionError as err:
            message = str(err).splitlines()[0].split("resolving interpolation: ", 1)[-1]
            raise ConfigError(message if message.startswith(key) else
                              f"{key}: {message}") from None
        if value == UNSET and f.metadata["unset"]:
            raise ConfigError(f.metadata["unset"].format(name=tree.get("name", "")))
        if value == UNSET:
            raise ConfigError(f"{key}=??? must be set (e.g. on the command line, {key}=...): "
                              f"expected {_expected(hints[f.name], f.metadata)}")
        _check_value(key, value, hints[f.name], f.metadata, strict, root)


def _plain(tree: Any) -> Any:
    return OmegaConf.to_container(tree, resolve=False) if OmegaConf.is_config(tree) else tree


def dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    """Every key of a config (groups of keys included) as ``a.b.c``, values unresolved."""
    tree = _plain(tree)
    if not isinstance(tree, Mapping):
        return []
    keys = []
    for name, node in tree.items():
        keys.append(f"{prefix}{name}")
        keys += dotted_keys(node, f"{prefix}{name}.")
    return keys


def unknown_key(key: str, value: str, keys: Sequence[str]) -> ConfigError:
    """The one line for ``key=value`` where the config has no ``key``: the nearest of
    ``keys`` by difflib's ratio of the dotted paths, else of their last names (``trainer.lr``:
    ``optim.lr``); a group that holds ``key``'s place, or a key whose last name is unlike
    ``key``'s (``trainer.ema`` for ``trainer.lr``), is no answer."""
    name = key.rsplit(".", 1)[-1]
    keys = [k for k in keys if not key.startswith(k + ".")]
    alike = [k for k in keys if difflib.SequenceMatcher(
        None, name, k.rsplit(".", 1)[-1]).ratio() >= 0.5]
    near = difflib.get_close_matches(key, alike, n=1, cutoff=0.6)
    if not near:
        names = difflib.get_close_matches(name, {k.rsplit(".", 1)[-1] for k in keys}, n=1,
                                          cutoff=0.8)
        near = difflib.get_close_matches(key, [k for k in keys if names and
                                               k.rsplit(".", 1)[-1] == names[0]], n=1, cutoff=0)
    hint = f"the nearest existing key: {near[0]}" if near else \
        "python -m segtrain --cfg job lists the keys"
    return ConfigError(f"{key}={value}: no such key; {hint}")


def _check_value(key: str, value: Any, kind: Any, meta: dict, strict: bool = False,
                 root: Mapping[str, Any] | None = None) -> None:
    if kind is Any:
        return
    nullable = _is_union(kind) and type(None) in get_args(kind)
    if nullable:
        kind = next(a for a in get_args(kind) if a is not type(None))
    if value is None:
        if not nullable:
            raise ConfigError(f"{key}=null: expected {_describe(kind, meta)}")
        return
    if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected a group of keys "
                              f"({', '.join(f.name for f in fields(kind))})")
        check(value, kind, prefix=f"{key}.", strict=strict, root=root)
        return
    if get_origin(kind) is list:
        item = get_args(kind)[0]
        if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence) or \
                (not value and not meta["empty_ok"]) or \
                (meta["length"] is not None and len(value) != meta["length"]) or \
                not all(_fits(v, item, meta) for v in value):
            raise ConfigError(f"{key}={_show(value)}: expected {_describe(kind, meta)}"
                              f"{' or null' if nullable else ''}")
        return
    if not _fits(value, kind, meta):
        raise ConfigError(f"{key}={_show(value)}: expected {_describe(kind, meta)}"
                          f"{' or null' if nullable else ''}")


def _fits(value: Any, kind: type, meta: dict) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return False
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value)):
        return False
    if kind is str and not isinstance(value, str):
        return False
    if meta["choices"] is not None and value not in meta["choices"]:
        return False
    if meta["pattern"] is not None and not re.fullmatch(meta["pattern"], value):
        return False
    low, high = meta["low"], meta["high"]
    if low is not None and (value <= low if meta["open_low"] else value < low):
        return False
    return high is None or (value < high if meta["open_high"] else value <= high)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(kind: Any, meta: dict) -> str:
    if _is_union(kind):
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is list:
        item = get_args(kind)[0]
        size = "a list" if meta["empty_ok"] else "a non-empty list"
        if meta["length"] is not None:
            size = f"a list of {meta['length']}"
        return f"{size}, each {_describe(item, meta)}"
    if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
        return f"a group of keys ({', '.join(f.name for f in fields(kind))})"
    if meta["choices"] is not None:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    text = _NAMES[kind]
    if meta["allowed"] is not None:
        return meta["allowed"]
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        left = "(" if meta["open_low"] else "["
        right = ")" if meta["open_high"] else "]"
        return f"{text} in {left}{low}, {high}{right}"
    if low is not None:
        return f"{text} {'>' if meta['open_low'] else '>='} {low}"
    if high is not None:
        return f"{text} {'<' if meta['open_high'] else '<='} {high}"
    return text


def _expected(kind: Any, meta: dict) -> str:
    nullable = _is_union(kind) and type(None) in get_args(kind)
    return _describe(kind, meta) + (" or null" if nullable else "")


def _is_union(kind: Any) -> bool:
    return get_origin(kind) in (Union, types.UnionType)


def _show(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"[{', '.join(_show(v) for v in value)}]"
    return repr(value) if isinstance(value, str) else str(value)
