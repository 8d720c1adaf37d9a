"""The effective settings of a run, as training resolves them, beside its paper's protocol.

    python -m segtrain.protocol experiment=deeplabv2_lr_policy \
        +paper_row=deeplabv2_table2_poly_b30_6k format=json
    python -m segtrain.protocol experiment=spnet_ade20k ranks=8 format=json
    python -m segtrain.protocol all format=markdown > docs/protocols.md

Every value comes from the function training calls: the batch from ``app.train_batch`` (the
one resolution of ``trainer.global_batch_size`` / ``batch_size`` / ``iter_size`` on ``ranks``
ranks), the optimizer groups from ``app.param_groups`` on the network ``app.build_model``
builds (on the meta device: shapes without weights), BatchNorm from that network's modules,
the evaluation from ``app.build_inference``. The paper's values are the ``protocol:`` block of
``conf/experiment/paper/<experiment>.yml`` (each with its source, or ``unknown`` with why);
a difference is marked, with its reason where ``deviations:`` lists it. For an experiment with
a paper file every row is shown too, with the row's own effective settings.

``format=json`` prints ``{"effective", "paper", "differences", "rows"}``; a bad override is
one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from segtrain import app, config_schema
from segtrain.errors import ConfigError, UserError

PAPER_DIR = app.CONF_DIR / "experiment" / "paper"
UNKNOWN = "unknown"
FORMATS = ("table", "json", "markdown")
#: what a paper row may not change: these follow the number of GPUs, not the paper
RANK_KEYS = ("per_rank_batch", "iter_size", "ranks")
#: the ``model.*`` keys that name the network a paper row varies
NETWORK_KEYS = ("backbone", "head", "separable", "stride", "learnable_upsampling")


# --- composition ----------------------------------------------------------------------------

def compose(overrides: Sequence[str]) -> DictConfig:
    """``conf/config.yaml`` with ``overrides``, as ``python -m segtrain`` composes it."""
    with hydra.initialize_config_dir(config_dir=str(app.CONF_DIR), version_base="1.3"):
        return hydra.compose(config_name="config", overrides=list(overrides))


def experiment_of(overrides: Sequence[str]) -> str | None:
    names = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("experiment=")]
    return names[-1] if names else None


def paper_file(experiment: str | None) -> dict | None:
    """The parsed ``conf/experiment/paper/<experiment>.yml``; ``None`` where there is none."""
    if experiment is None:
        return None
    path = PAPER_DIR / f"{experiment}.yml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def row_overrides(row: Mapping) -> list[str]:
    """A paper row's ``overrides`` as command-line overrides."""
    def text(value: Any) -> str:
        return (str(value).lower() if isinstance(value, bool) else str(value)).replace(" ", "")

    return [f"{key}={text(value)}" for key, value in (row.get("overrides") or {}).items()]


# --- effective settings ---------------------------------------------------------------------

def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _name(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _params(node: Mapping, drop: Sequence[str] = ()) -> dict:
    return {k: v for k, v in node.items() if not k.startswith("_") and k not in drop}


def _meta_model(cfg: DictConfig) -> torch.nn.Module:
    """``app.build_model`` on the meta device, without pretrained weights (shapes only)."""
    cfg = cfg.copy()
    if "pretrained" in cfg.model:
        cfg.model.pretrained = None
    with torch.device("meta"):
        return app.build_model(cfg)


def _batchnorm(cfg: DictConfig, model: torch.nn.Module) -> dict:
    """Mode and momentum of the network's BatchNorm layers, read from the built modules."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return {"mode": "none", "momentum": None}
    frozen = all(not p.requires_grad for m in bns for p in m.parameters()) and \
        bool(cfg.model.get("freeze_bn", False))
    mode = "frozen" if frozen else "sync" if cfg.trainer.sync_bn else "trained"
    momenta = sorted({m.momentum for m in bns}, key=lambda x: (x is None, x))
    return {"mode": mode, "momentum": None if frozen else
            (momenta[0] if len(momenta) == 1 else momenta)}


def _evaluation(cfg: DictConfig) -> dict:
    inference = app.build_inference(cfg)
    p = inference.predictor
    crf = inference.crf
    window = list(p.crop_size) if p.mode == "slide" else None
    stride = list(p.stride) if p.mode == "slide" else None
    return {"mode": p.mode, "scales": list(p.scales), "flip": bool(p.flip),
            "fusion": p.fusion if len(p.scales) > 1 or p.flip or p.mode == "slide" else None,
            "window": window, "stride": stride,
            "crf": None if crf is None else
            {"iterations": crf.iterations, "pos_w": crf.pos_w, "pos_xy_std": crf.pos_xy_std,
             "bi_w": crf.bi_w, "bi_xy_std": crf.bi_xy_std, "bi_rgb_std": crf.bi_rgb_std}}


def _augmentation(cfg: DictConfig) -> dict:
    aug = _plain(cfg.dataset.get("augment")) or {}
    keep = ("scales", "continuous_scale", "rotate", "blur", "hflip", "color_jitter",
            "elastic_std")
    return {k: aug.get(k) for k in keep if k in aug}


def _sampling(cfg: DictConfig) -> Any:
    """``dataset.class_uniform`` in the reference's terms (``segtrain.data.class_uniform``),
    else "uniform"."""
    options = _plain(cfg.dataset.get("class_uniform")) or {}
    if not options.get("pct"):
        return "uniform"
    return {"class_uniform_pct": float(options["pct"]), "class_uniform_tile": int(options["tile"])}


def _loss(cfg: DictConfig) -> dict:
    node = _plain(cfg.loss)
    out = {"name": _name(node["_target_"])}
    out.update(_params(node, drop=("ignore_index", "prior_size")))
    return out


REQUIRED = "required on the command line"


def _checked(cfg: DictConfig) -> DictConfig:
    """``cfg`` through the schema training applies first; a ``model.init_from`` the command
    line must give (FCN-16s, DeepLab v3's second stage) is shown as required, not refused."""
    cfg = cfg.copy()
    if (_plain(cfg.model) or {}).get("init_from") == "???":
        cfg.model.init_from = REQUIRED
    if OmegaConf.to_container(cfg.dataset, resolve=False).get("root") == "???":
        cfg.dataset.root = "<dataset.root>"  # where the data is: no protocol setting
    config_schema.check(cfg)
    return cfg


def effective(cfg: DictConfig, ranks: int = 1) -> dict:
    """The settings the run of ``cfg`` on ``ranks`` ranks trains and evaluates with."""
    cfg = _checked(cfg)
    batch = app.train_batch(cfg, ranks)
    model = _meta_model(cfg)
    groups = app.param_groups(cfg, model)
    lr = _plain(cfg.lr)
    optim = _plain(cfg.optim)
    data = cfg.dataset
    train_split = OmegaConf.select(data, "train.split", default=None)
    msc = (_plain(cfg.model.get("msc")) or {}).get("train_scales")
    trained_os = getattr(model, "output_stride", None)
    init_from = OmegaConf.select(cfg, "model.init_from", default=None)
    return {
        "images_per_step": batch.images_per_step,
        "per_rank_batch": batch.per_rank,
        "iter_size": batch.iter_size,
        "ranks": batch.world_size,
        "max_iters": int(cfg.trainer.max_iters),
        "train_split": train_split,
        "eval_split": OmegaConf.select(data, "val.split", default=None),
        "crop_size": _plain(OmegaConf.select(data, "augment.crop_size", default=None)),
        "augmentation": _augmentation(cfg),
        "sampling": _sampling(cfg),
        "optimizer": _name(optim["_target_"]),
        "base_lr": float(optim["lr"]),
        "lr_policy": {"name": _name(lr["_target_"]), **_params(lr)},
        "momentum": optim.get("momentum", optim.get("betas")),
        "weight_decay": float(optim.get("weight_decay", 0.0)),
        "param_groups": {g.get("name", str(i)): {"lr_mult": float(g.get("lr_mult", 1.0)),
                                                 "decay_mult": float(g.get("weight_decay_mult",
                                                                           1.0))}
                         for i, g in enumerate(groups)},
        "batchnorm": _batchnorm(cfg, model),
        "output_stride_train": trained_os,
        "output_stride_eval": cfg.eval.get("output_stride") or trained_os,
        "msc_train_scales": msc,
        "loss": _loss(cfg),
        "evaluation": _evaluation(cfg),
        "network": {"name": _name(cfg.model._target_),
                    **{k: _plain(cfg.model.get(k)) for k in NETWORK_KEYS if k in cfg.model}},
        "pretrained": _plain(cfg.model.get("pretrained")),
        "init_from": None if init_from in (None, "") else str(init_from),
    }


# --- the paper's protocol -------------------------------------------------------------------

def _same(ours: Any, paper: Any) -> bool:
    """``paper`` (a value, or a mapping giving some keys) holds for ``ours``."""
    if isinstance(paper, Mapping):
        # a key we lack (an optimizer group with no parameters) holds vacuously
        return isinstance(ours, Mapping) and all(
            _same(ours[k], v) for k, v in paper.items() if k in ours)
    if isinstance(paper, (list, tuple)):
        return isinstance(ours, (list, tuple)) and len(ours) == len(paper) and \
            all(_same(a, b) for a, b in zip(ours, paper))
    if isinstance(paper, bool) or isinstance(ours, bool):
        return ours is paper or ours == paper
    if isinstance(paper, (int, float)) and isinstance(ours, (int, float)):
        return math.isclose(float(ours), float(paper), rel_tol=1e-6, abs_tol=1e-12)
    return ours == paper


def paper_values(data: Mapping | None, row: Mapping | None = None) -> dict:
    """``{key: value}`` of the paper file's ``protocol:`` block (``unknown`` kept as is),
    with a row's own ``protocol:`` values over it."""
    if not data:
        return {}
    values = {key: entry["value"] for key, entry in (data.get("protocol") or {}).items()}
    for key, value in ((row or {}).get("protocol") or {}).items():
        base = values.get(key)
        values[key] = {**base, **value} if isinstance(base, Mapping) and \
            isinstance(value, Mapping) else value
    return values


def row_of(data: Mapping | None, overrides: Sequence[str]) -> Mapping | None:
    """The paper row whose overrides the command line gives (the most specific one), so that
    ``+paper_row=...`` is compared with that row's values."""
    given = set(overrides)
    rows = [r for r in (data or {}).get("rows") or []
            if row_overrides(r) and set(row_overrides(r)) <= given]
    return max(rows, key=lambda r: len(row_overrides(r)), default=None)


def differences(ours: Mapping, paper: Mapping, deviations: Mapping[str, str]) -> list[dict]:
    """Each known paper value our setting does not meet, with its deviation's reason (or
    ``None``: an undeclared difference)."""
    out = []
    for key, value in paper.items():
        if value == UNKNOWN or key not in ours:
            continue
        if not _same(ours[key], value):
            out.append({"key": key, "effective": ours[key], "paper": value,
                        "deviation": deviations.get(key)})
    return out


def deviations_of(data: Mapping | None) -> dict[str, str]:
    return {d["key"]: d["reason"] for d in ((data or {}).get("deviations") or [])}


def report(overrides: Sequence[str], ranks: int = 1) -> dict:
    """Effective settings, paper values and differences of the run ``overrides`` start, and of
    every row of its paper file."""
    return copy.deepcopy(_report(tuple(overrides), ranks))


@functools.lru_cache(maxsize=64)
def _report(overrides: tuple[str, ...], ranks: int) -> dict:
    overrides = list(overrides)
    cfg = compose(overrides)
    data = paper_file(experiment_of(overrides))
    devs = deviations_of(data)
    ours = effective(cfg, ranks)
    paper = paper_values(data, row_of(data, overrides))
    out = {"effective": ours, "paper": paper, "differences": differences(ours, paper, devs)}
    if data is not None and row_of(data, overrides) is None:
        rows = []
        for row in data.get("rows") or []:
            extra = row_overrides(row)
            row_ours = effective(compose(overrides + extra), ranks)
            row_paper = paper_values(data, row)
            rows.append({"name": row.get("name") or " ".join(extra) or "(the experiment)",
                         "overrides": extra, "value": row.get("value"),
                         "changes": {k: v for k, v in row_ours.items()
                                     if ours[k] != v and k not in RANK_KEYS},
                         "differences": differences(row_ours, row_paper, devs)})
        out["rows"] = rows
    return out


# --- output ---------------------------------------------------------------------------------

def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def _mark(key: str, diffs: Sequence[Mapping]) -> str:
    for d in diffs:
        if d["key"] == key:
            return f"DIFFERS: {d['deviation']}" if d["deviation"] else \
                "DIFFERS (no deviation listed)"
    return ""


def table(result: Mapping) -> str:
    lines = []
    width = max(len(k) for k in result["effective"])
    for key, value in result["effective"].items():
        paper = result["paper"].get(key)
        text = f"{key:<{width}}  {_show(value)}"
        if paper is not None:
            text += f"   | paper: {_show(paper)}"
        mark = _mark(key, result["differences"])
        lines.append(text + (f"   <- {mark}" if mark else ""))
    for row in result.get("rows", []):
        lines.append(f"row {row['name']} ({' '.join(row['overrides']) or 'no overrides'}):")
        for key, value in row["changes"].items():
            lines.append(f"  {key}: {_show(value)}")
        for d in row["differences"]:
            lines.append(f"  {d['key']} differs from the paper's {_show(d['paper'])}: "
                         f"{d['deviation'] or 'no deviation listed'}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return _show(value).replace("|", "/")


def markdown(experiment: str, result: Mapping) -> str:
    lines = [f"## {experiment}", "", "| setting | effective (1 rank) | paper | |",
             "|---|---|---|---|"]
    for key, value in result["effective"].items():
        if key in RANK_KEYS:
            continue
        paper = result["paper"].get(key, "")
        mark = _mark(key, result["differences"])
        lines.append(f"| {key} | {_cell(value)} | {_cell(paper) if paper != '' else ''} | "
                     f"{_cell(mark)} |")
    rows = result.get("rows") or []
    if rows:
        lines += ["", "| row | overrides | paper mIoU etc. | changes |", "|---|---|---|---|"]
        for row in rows:
            changes = "; ".join(f"{k} {_show(v)}" for k, v in row["changes"].items()
                                if k not in RANK_KEYS)
            lines.append(f"| {_cell(row['name'])} | {_cell(' '.join(row['overrides']))} | "
                         f"{_cell(row['value'])} | {_cell(changes) or '-'} |")
    return "\n".join(lines)


def experiments() -> list[str]:
    return sorted(p.stem for p in (app.CONF_DIR / "experiment").glob("*.yaml"))


def all_markdown() -> str:
    """docs/protocols.md: every experiment's effective settings beside its paper's."""
    parts = ["# Protocols: what each experiment runs, beside its paper", "",
             "Generated by `python -m segtrain.protocol all format=markdown > docs/protocols.md`"
             " from the configs and `conf/experiment/paper/*.yml` (a test keeps this file equal "
             "to that output). Effective values are resolved by the code training runs, on one "
             "rank; the paper column is the paper file's `protocol:` block (`unknown`: no "
             "source found, the file says why); DIFFERS marks a difference, with its reason "
             "from the file's `deviations:`.", ""]
    for name in experiments():
        parts += [markdown(name, report([f"experiment={name}"])), ""]
    return "\n".join(parts)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    options = {k: v for k, _, v in (a.partition("=") for a in args)
               if k in ("ranks", "format")}
    overrides = [a for a in args if a.partition("=")[0] not in ("ranks", "format")]
    try:
        fmt = options.get("format", "table")
        if fmt not in FORMATS:
            raise ConfigError(f"format={fmt}: expected one of {', '.join(FORMATS)}")
        try:
            ranks = int(options.get("ranks", "1"))
        except ValueError:
            ranks = 0
        if ranks < 1:
            raise ConfigError(f"ranks={options['ranks']}: expected an integer >= 1")
        if overrides == ["all"]:
            if fmt != "markdown":
                raise ConfigError("all: only with format=markdown (docs/protocols.md)")
            print(all_markdown(), end="")
            return 0
        result = report(overrides, ranks)
        if fmt == "json":
            print(json.dumps(_jsonable(result), indent=1))
        elif fmt == "markdown":
            print(markdown(experiment_of(overrides) or "run", result))
        else:
            print(table(result))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # Hydra's composition errors: an unknown option or key
        if type(err).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        message = " ".join(str(err).split()).split(" Config search path:")[0]
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
