"""conf/experiment/paper/*.yml: every row well-formed, every row's overrides compose with its
experiment and set what they say; the paper protocols the experiments follow (DeepLab v2
Table 2 as one sweep, DeepLab v3's two stages, frozen BatchNorm)."""

from __future__ import annotations

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from segtrain.eval.metrics import SUMMARY_METRICS
from tests.conftest import CONF_DIR, compose_config

PAPER_DIR = CONF_DIR / "experiment" / "paper"
PAPER_FILES = sorted(PAPER_DIR.glob("*.yml"))
ROW_KEYS = {"overrides", "value", "metric", "split", "table", "paper", "confirmed", "crf",
            "msc", "flip"}
OPTIONAL_KEYS = {"name", "note", "protocol", "stage"}
METRICS = set(SUMMARY_METRICS)
GROUPS = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def _load(path):
    return yaml.safe_load(path.read_text())


def _norm(value) -> str:
    if value is None:  # the command line's spelling of None
        return "null"
    return (str(value).lower() if isinstance(value, bool) else str(value)).replace(" ", "")


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_paper_file_is_well_formed(path):
    data = _load(path)
    assert set(data) <= {"rows", "other", "pending", "protocol", "deviations", "stages",
                         "train"}, path.name
    stages = data.get("stages") or {}
    for name, stage in stages.items():
        assert set(stage) <= {"experiment", "overrides", "after", "note"}, f"{path.name}: {name}"
        assert stage.get("after") in (None, *stages), f"{path.name}: {name}.after"
    rows = data.get("rows") or []
    for row in rows:
        assert ROW_KEYS <= set(row) <= ROW_KEYS | OPTIONAL_KEYS, f"{path.name}: {row}"
        assert all(row[k] is not None for k in row), f"{path.name}: a key without value: {row}"
        assert row["metric"] in METRICS, path.name
        assert 0 < float(row["value"]) <= 100, path.name
        assert all(isinstance(row[k], bool) for k in ("crf", "msc", "flip")), path.name
        assert isinstance(row["overrides"], dict), path.name
    # one number per setting and metric: otherwise a run would get two paper values
    for row in rows:
        assert row.get("stage") in (None, *stages), f"{path.name}: stage of {row}"
    keys = [(tuple(sorted((k, _norm(v)) for k, v in r["overrides"].items())), r["metric"],
             r.get("stage")) for r in rows]
    assert len(keys) == len(set(keys)), f"{path.name}: two rows with the same setting"
    for entry in data.get("other") or []:
        # a flow mapping cut at a comma leaves keys without value: quote such strings
        assert all(v is not None for v in entry.values()), f"{path.name}: {entry}"
        assert {"value", "metric", "split"} <= set(entry), f"{path.name}: {entry}"
        assert {"table", "confirmed"} & set(entry), f"{path.name}: {entry} names no source"
        assert entry["metric"] in METRICS
    for reason in data.get("pending") or []:
        assert isinstance(reason, str) and len(reason) > 20, path.name


def _override(key: str, value) -> str:
    return f"{key}={_norm(value)}"


ROWS = [(path.stem, i, row) for path in PAPER_FILES
        for i, row in enumerate(_load(path).get("rows") or [])]


@pytest.mark.parametrize("experiment,index,row", ROWS,
                         ids=[f"{e}-{i}" for e, i, _ in ROWS])
def test_row_overrides_compose_with_their_experiment(experiment, index, row, tmp_path):
    overrides = [_override(k, v) for k, v in row["overrides"].items()]
    cfg = compose_config([f"experiment={experiment}", f"++dataset.root={tmp_path}",
                          "++model.init_from=null", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["num_classes"] == resolved["dataset"]["num_classes"]
    for key, value in row["overrides"].items():
        name = key.lstrip("+~")
        if name in GROUPS:  # a group choice (eval=msc_flip, +paper_row=...) has no cfg key
            continue
        got = OmegaConf.select(cfg, name)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert _norm(got) == _norm(value), f"{experiment} row {index}: {name}={got}"


def test_inference_flags_agree_with_the_eval_overrides():
    # the crf/msc/flip columns say what the row's eval option does
    for experiment, index, row in ROWS:
        overrides = [_override(k, v) for k, v in row["overrides"].items()]
        cfg = compose_config([f"experiment={experiment}", "++dataset.root=/x",
                              "++model.init_from=null", *overrides])
        msc = len(cfg.eval.predictor.scales) > 1 or cfg.model.msc.train_scales is not None
        assert bool(cfg.eval.crf) == row["crf"], (experiment, index)
        assert msc == row["msc"], (experiment, index)
        assert bool(cfg.eval.predictor.flip) == row["flip"], (experiment, index)


def test_deeplabv1_steps_every_2000():
    # the batch of 20 is checked through training's resolution in tests/test_protocol.py
    cfg = compose_config(["experiment=deeplabv1_voc", "dataset.root=/x"])
    assert list(cfg.lr.milestones) == [2000, 4000] and cfg.lr.gamma == 0.1
    assert cfg.lr._target_.endswith(".step")


def test_deeplabv3_two_stages():
    first = compose_config(["experiment=deeplabv3_voc", "dataset.root=/x"])
    second = compose_config(["experiment=deeplabv3_voc_trainval", "dataset.root=/x",
                             "model.init_from=/runs/stage1"])
    assert (first.dataset.split, first.model.output_stride, first.optim.lr,
            first.trainer.max_iters, first.trainer.global_batch_size, first.model.freeze_bn) == \
        ("train_aug", 16, 0.007, 30000, 16, False)
    assert (second.dataset.split, second.model.output_stride, second.optim.lr,
            second.trainer.max_iters, second.model.freeze_bn, second.model.init_from) == \
        ("trainval", 8, 0.001, 30000, True, "/runs/stage1")
    assert second.model.pretrained is None
    # everything else is the first stage's protocol
    assert second.dataset.crop_size == first.dataset.crop_size
    assert second.trainer.global_batch_size == 16 and second.lr.power == 0.9


@pytest.mark.parametrize("cls_name", ["DeepLabV3", "DeepLabV3Plus"])
def test_frozen_batchnorm_in_deeplab_v3(cls_name, one_thread):
    from segtrain.models import deeplabv3

    kwargs = dict(num_classes=3, backbone="mobilenetv2", output_stride=16, multi_grid=None,
                  atrous_rates=[], aspp_dropout=0.0, pretrained=None, freeze_bn=True)
    if cls_name == "DeepLabV3Plus":
        kwargs.update(separable=False, low_level_channels=8, decoder_channels=16)
    torch.manual_seed(0)
    model = getattr(deeplabv3, cls_name)(**kwargs).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    grouped = {id(p) for g in model.param_groups() for p in g["params"]}
    assert not grouped & {id(p) for m in bns for p in m.parameters()}
    x = torch.randn(2, 3, 32, 32)
    before = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        train_out = model(x)["out"]
        eval_out = model.eval()(x)["out"]
    # training mode normalises with the stored statistics and does not update them
    torch.testing.assert_close(train_out, eval_out)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))


@pytest.mark.parametrize("experiment", ["deeplabv1_voc", "deeplabv2_lr_policy",
                                        "deeplabv2_aspp_ablation", "deeplabv2_voc",
                                        "deeplabv2_resnet_ablation", "deeplabv2_pascal_context"])
def test_deeplab_v1_v2_train_on_labels_shrunk_by_8(experiment):
    """DeepLab v1/v2 compare the stride-8 logits with the label shrunk by 8 (the released train
    prototxts' "label_shrink" Interp layer; v3 Sec. 4.1 "Upsampling logits" names it as the
    v1/v2 practice it changes). The VGG-16 experiments (v1, v2 Tables 2-3) missed it."""
    cfg = compose_config([f"experiment={experiment}", "dataset.root=/x"])
    assert cfg.loss.label_stride == 8, experiment


@pytest.mark.parametrize("experiment", ["deeplabv3_voc", "deeplabv3plus_voc"])
def test_deeplab_v3_upsamples_the_logits_instead(experiment):
    """DeepLab v3 Sec. 4.1: the logits are upsampled, the ground truth is not downsampled."""
    cfg = compose_config([f"experiment={experiment}", "dataset.root=/x"])
    assert cfg.loss.label_stride is None, experiment


STAGES = [(path.stem, name, stage) for path in PAPER_FILES
          for name, stage in (_load(path).get("stages") or {}).items()]


@pytest.mark.parametrize("paper,name,stage", STAGES, ids=[f"{p}-{n}" for p, n, _ in STAGES])
def test_stage_overrides_compose_with_their_experiment(paper, name, stage, tmp_path):
    """A stage of a paper file (segtrain.reproduce runs it before the rows that start from
    it) composes: its experiment, its overrides, each key at its value."""
    overrides = [_override(k, v) for k, v in (stage.get("overrides") or {}).items()]
    cfg = compose_config([f"experiment={stage.get('experiment', paper)}",
                          f"++dataset.root={tmp_path}", "++model.init_from=null", *overrides])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["num_classes"] == resolved["dataset"]["num_classes"]
    for key, value in (stage.get("overrides") or {}).items():
        if key.lstrip("+~") not in GROUPS:
            got = OmegaConf.select(cfg, key.lstrip("+~"))
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert _norm(got) == _norm(value), f"{paper} stage {name}: {key}={got}"


def test_staged_chains_of_the_issue():
    """FCN 32s -> 16s -> 8s, DeepLab v2 TABLE 4 and Context from one COCO stage each, DeepLab
    v3's trainval stage after trainaug (Long et al. Sec. 4.2; Chen et al. TPAMI Sec. 4;
    Chen et al. 2017 Sec. 4.1)."""
    def load(name):
        return _load(CONF_DIR / "experiment" / "paper" / f"{name}.yml")

    fcn8s = load("fcn8s_voc")
    assert fcn8s["stages"]["fcn16s"] == {"experiment": "fcn16s_voc", "after": "fcn32s"}
    assert fcn8s["stages"]["fcn32s"] == {"experiment": "fcn32s_voc"}
    assert {r["stage"] for r in fcn8s["rows"]} == {"fcn16s"}
    assert load("deeplabv3_voc_trainval")["stages"]["trainaug"]["experiment"] == "deeplabv3_voc"
    assert [r.get("stage") for r in load("deeplabv2_pascal_context")["rows"]] == \
        ["coco", "coco"]
