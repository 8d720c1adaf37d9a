"""ADE20K and PASCAL-Context against miniatures of their exact on-disk layouts.

ADE20K: 0 -> ignore, 1..150 -> 0..149, both splits, partial downloads. PASCAL-Context: the
authors' .mat LabelMaps converted once by scripts/prepare_pascal_context.py (names matched
across labels.txt and 59_labels.txt, the cache kept), then read as 59 classes (background
ignored) or 60 (background class 0). Both through their YAML configs, check_dataset.py and
dataset_stats.py; their experiments compose with the paper files they name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from dataset_miniatures import (
    ADE20K_RAW,
    CONTEXT_RAW_TO_PNG,
    make_ade20k,
    make_pascal_context,
    save_png,
)
from PIL import Image
from test_datasets import build, check_item, dataset_cfg, load_script

from segtrain.data import ade20k as ade20k_module
from segtrain.data import pascal_context as context_module
from segtrain.data.ade20k import ADE20K
from segtrain.data.base import DatasetError
from segtrain.data.pascal_context import CLASS_NAMES_59, PascalContext
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- ADE20K


def test_ade20k_layout_and_label_mapping(tmp_path):
    info = make_ade20k(tmp_path)
    ade = info["ade"]
    for root in (tmp_path, ade):  # ADEChallengeData2016 or the folder holding it
        assert len(ADE20K(root, "train")) == 3
        assert len(ADE20K(root, "val")) == 2
    ds = ADE20K(ade, "train")
    assert ds.num_classes == 150 and ds.palette.shape == (150, 3)
    assert ds.class_names[0] == "wall" and ds.class_names[149] == "flag"
    image, mask, meta = ds.load(0)
    assert meta["name"] == "ADE_train_00000001" and image.shape == (30, 40, 3)
    raw = info["labels"][meta["name"]]
    for value, expected in ((0, 255), (1, 0), (2, 1), (75, 74), (149, 148), (150, 149)):
        y, x = np.argwhere(raw == value)[0]
        assert mask[y, x] == expected, (value, expected)
    np.testing.assert_array_equal(mask, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    assert set(np.unique(mask).tolist()) == {255, 0, 1, 74, 148, 149}
    assert ADE20K(ade, "val").load(1)[2]["label_path"].endswith(
        "annotations/validation/ADE_val_00000002.png")
    # dataset.ignore_index reaches the labels: "other" (raw 0) becomes it
    mask200 = ADE20K(ade, "train", ignore_index=200).load(0)[1]
    np.testing.assert_array_equal(mask200, np.where(raw == 0, 200, mask))


def test_ade20k_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"does not exist.*ADEChallengeData2016\.zip"):
        ADE20K(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images/ or annotations/ folder"):
        ADE20K(tmp_path / "empty", "train")
    ade = make_ade20k(tmp_path / "data")["ade"]
    with pytest.raises(DatasetError, match="unknown split 'training'"):
        ADE20K(ade, "training")
    # a partly extracted archive: an image without its annotation, and the reverse
    (ade / "annotations/training/ADE_train_00000002.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 3 train samples in .*images/training "
                                           r"have no counterpart .*ADE_train_00000002.*"
                                           r"download is incomplete"):
        ADE20K(ade, "train")
    (ade / "images/validation/ADE_val_00000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"annotations/validation have no counterpart "
                                           r"in .*images/validation.*ADE_val_00000001"):
        ADE20K(ade, "val")
    label = ade / "annotations/validation/ADE_val_00000002.png"
    save_png(label, np.full((30, 40), 151, np.uint8))
    (ade / "annotations/validation/ADE_val_00000001.png").unlink()
    ds = ADE20K(ade, "val")
    with pytest.raises(DatasetError, match=r"ADE_val_00000002\.png.*\[151\].*0\.\.150"):
        ds[0]
    import shutil
    shutil.rmtree(ade / "annotations")
    with pytest.raises(DatasetError, match="annotation folder not found"):
        ADE20K(ade, "train")


# --------------------------------------------------------------------------- PASCAL-Context


@pytest.fixture
def context(tmp_path):
    """The miniature, converted once by the preparation script."""
    info = make_pascal_context(tmp_path)
    prepare = load_script("prepare_pascal_context")
    assert prepare.main(["--voc", str(info["voc"]), "--context", str(info["context"]),
                         "--workers", "1"]) == 0
    return info


def test_prepare_pascal_context_writes_59_class_pngs(context):
    out = context["voc"] / "SegmentationClassContext"
    names = sorted(p.stem for p in out.glob("*.png"))
    assert names == sorted(context["ids"]["train"] + context["ids"]["val"])
    for name, label_map in context["label_maps"].items():
        with Image.open(out / f"{name}.png") as img:
            assert img.mode == "L"
            png = np.asarray(img)
        expected = np.vectorize(CONTEXT_RAW_TO_PNG.get)(label_map)
        np.testing.assert_array_equal(png, expected)
    # the three classes 59_labels.txt spells differently reach their labels.txt index
    for index, name in ((397, "table"), (19, "bedclothes"), (80, "cloth")):
        assert CLASS_NAMES_59[CONTEXT_RAW_TO_PNG[index] - 1] == name


def test_pascal_context_59_ignores_background_and_60_keeps_it(context):
    voc = context["voc"]
    name = context["ids"]["train"][0]
    label_map = context["label_maps"][name]
    ds59, ds60 = PascalContext(voc, "train", classes=59), PascalContext(voc, "train", 60)
    assert len(ds59) == 3 and len(PascalContext(voc, "val", 59)) == 2
    assert ds59.num_classes == 59 and ds60.num_classes == 60
    assert ds60.class_names[0] == "background" and ds60.class_names[1:] == ds59.class_names
    assert (ds60.palette[1:] == ds59.palette).all()  # a class keeps its colour
    mask59, mask60 = ds59.load(0)[1], ds60.load(0)[1]
    for raw, png in CONTEXT_RAW_TO_PNG.items():
        y, x = np.argwhere(label_map == raw)[0]
        assert mask60[y, x] == png, raw
        assert mask59[y, x] == (255 if png == 0 else png - 1), raw
    # dataset.ignore_index reaches the 59-class labels: background becomes it
    mask59_200 = PascalContext(voc, "train", 59, ignore_index=200).load(0)[1]
    np.testing.assert_array_equal(mask59_200, np.where(mask59 == 255, 200, mask59))
    y, x = np.argwhere(label_map == 397)[0]
    assert ds59.class_names[mask59[y, x]] == "table"
    assert ds60.class_names[mask60[y, x]] == "table"
    for root in (voc.parent, voc.parent.parent):  # VOCdevkit or the folder above
        assert len(PascalContext(root, "val", 60)) == 2


def test_prepare_pascal_context_cache(context, capsys):
    prepare = load_script("prepare_pascal_context")
    voc, ctx = context["voc"], context["context"]
    png = voc / "SegmentationClassContext" / f"{context['ids']['val'][0]}.png"
    os.utime(png, (1, 1))
    args = ["--voc", str(voc), "--context", str(ctx), "--workers", "1"]
    assert prepare.main(args) == 0
    assert "wrote 0 label PNGs" in capsys.readouterr().out and png.stat().st_mtime == 1
    assert prepare.main(args + ["--overwrite"]) == 0
    assert "wrote 5 label PNGs" in capsys.readouterr().out and png.stat().st_mtime > 1
    # another label list: the PNGs of the old mapping are redone, not reused
    labels = ctx / "labels.txt"
    labels.write_text(labels.read_text().replace("458: wood", "458: other wood")
                      .replace("457: other class 457", "457: wood"))
    assert prepare.main(args) == 0
    captured = capsys.readouterr()
    assert "converting everything again" in captured.err and "wrote 5" in captured.out


def test_prepare_pascal_context_errors(tmp_path, capsys):
    info = make_pascal_context(tmp_path)
    prepare = load_script("prepare_pascal_context")
    voc, ctx = info["voc"], info["context"]
    with pytest.raises(prepare.PrepareError, match="no trainval/ folder"):
        prepare.prepare(voc, tmp_path / "nothing")
    with pytest.raises(prepare.PrepareError, match="not VOC 2010: no JPEGImages"):
        prepare.prepare(tmp_path, ctx)
    missing = ctx / "trainval" / f"{info['ids']['val'][1]}.mat"
    missing.rename(tmp_path / "kept.mat")
    with pytest.raises(prepare.PrepareError, match=r"1 of 5 PASCAL-Context annotation\(s\) "
                                                   r"missing .*download is incomplete"):
        prepare.prepare(voc, ctx)
    (tmp_path / "kept.mat").rename(missing)
    text = (ctx / "59_labels.txt").read_text()
    (ctx / "59_labels.txt").write_text(text.replace(": wood", ": timber"))
    with pytest.raises(prepare.PrepareError, match=r"unexpected \['timber'\], missing "
                                                   r"\['wood'\]"):
        prepare.prepare(voc, ctx)
    (ctx / "59_labels.txt").write_text(text + "oops\n")
    with pytest.raises(prepare.PrepareError, match=r"59_labels\.txt:60: expected "
                                                   r"'<index>: <name>'"):
        prepare.prepare(voc, ctx)
    (ctx / "59_labels.txt").write_text(text)
    import scipy.io
    scipy.io.savemat(missing, {"LabelMap": np.full((30, 40), 500, np.uint16)})
    with pytest.raises(prepare.PrepareError, match=r"\[500\] are not indices of labels\.txt"):
        prepare.prepare(voc, ctx)
    scipy.io.savemat(missing, {"LabelMap": np.zeros((10, 40), np.uint16)})
    assert prepare.main(["--voc", str(voc), "--context", str(ctx), "--workers", "1"]) == 1
    assert "LabelMap is 40x10 but its image" in capsys.readouterr().err
    scipy.io.savemat(missing, {"Other": np.zeros((30, 40), np.uint16)})
    with pytest.raises(prepare.PrepareError, match="no variable 'LabelMap'"):
        prepare.prepare(voc, ctx)


def test_pascal_context_errors(tmp_path):
    info = make_pascal_context(tmp_path)
    voc = info["voc"]
    with pytest.raises(DatasetError, match=r"does not exist.*VOCtrainval_03-May-2010"):
        PascalContext(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match=r"label folder not found.*prepare_pascal_context"):
        PascalContext(voc, "train")
    load_script("prepare_pascal_context").main(
        ["--voc", str(voc), "--context", str(info["context"]), "--workers", "1"])
    with pytest.raises(DatasetError, match=r"dataset.classes=61, expected 59"):
        PascalContext(voc, "train", classes=61)
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        PascalContext(voc, "test")
    name = info["ids"]["val"][0]
    (voc / "SegmentationClassContext" / f"{name}.png").unlink()
    with pytest.raises(DatasetError, match=rf"1 of the 2 val labels are missing .*{name}\.png"
                                           r".*prepare_pascal_context\.py"):
        PascalContext(voc, "val")
    (voc / "JPEGImages" / f"{info['ids']['train'][2]}.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 3 train images are missing.*incomplete"):
        PascalContext(voc, "train")
    other = info["ids"]["val"][1]
    save_png(voc / "SegmentationClassContext" / f"{other}.png", np.full((30, 40), 60, np.uint8))
    (voc / "ImageSets/Main/val.txt").write_text(f"{other}\n")
    with pytest.raises(DatasetError, match=r"\[60\].*0\.\.59, as scripts/prepare_pascal"):
        PascalContext(voc, "val")[0]


# --------------------------------------------------------------------------- configs, scripts


def test_configs_build_through_the_yaml_pipelines(context, tmp_path):
    make_ade20k(tmp_path / "ade")
    cases = (("ade20k", tmp_path / "ade", [], 150),
             ("pascal_context", context["voc"], [], 59),
             ("pascal_context", context["voc"], ["dataset.classes=60"], 60))
    for name, root, extra, classes in cases:
        cfg = dataset_cfg(name, f"dataset.root={root}", "dataset.crop_size=[24,32]", *extra)
        assert cfg.num_classes == classes and cfg.ignore_index == 255
        train, val = build(cfg, "train"), build(cfg, "val")
        for ds in (train, val):
            assert ds.num_classes == classes and len(ds.palette) >= classes
            assert ds.ignore_index == cfg.ignore_index  # the config's, passed on
        check_item(train[0], 3, (24, 32))
        check_item(val[0], 3, (30, 40))  # evaluation keeps the full image


def test_check_dataset_reads_both_and_compares_split_sizes(context, tmp_path, monkeypatch,
                                                           capsys):
    make_ade20k(tmp_path / "ade")
    check = load_script("check_dataset")
    ade_args = ["dataset=ade20k", f"dataset.root={tmp_path / 'ade'}", "--workers", "0"]
    assert check.main(ade_args) == 1  # 3 + 2 images are not the release's 20,210 + 2,000
    out = capsys.readouterr().out
    assert "split size differs from the release: 2" in out
    assert "ade20k train (train): 3 samples, the official release has 20210" in out
    monkeypatch.setattr(ade20k_module, "SPLIT_SIZES", {"train": 3, "val": 2})
    assert check.main(ade_args) == 0 and "ade20k: no problems" in capsys.readouterr().out
    monkeypatch.setattr(context_module, "SPLIT_SIZES", {"train": 3, "val": 2})
    voc = context["voc"]
    args = ["dataset=pascal_context", f"dataset.root={voc}", "dataset.classes=60",
            "--workers", "0"]
    assert check.main(args) == 0
    save_png(voc / "SegmentationClassContext" / f"{context['ids']['val'][1]}.png",
             np.full((30, 40), 77, np.uint8))
    assert check.main(args) == 1
    out = capsys.readouterr().out
    assert "label value out of range: 1" in out and "[77]" in out


def test_dataset_stats_on_ade20k(tmp_path, capsys):
    info = make_ade20k(tmp_path)
    script = load_script("dataset_stats")
    rc = script.main(["dataset=ade20k", f"dataset.root={info['ade']}",
                      "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0 and "images=3" in out and "weights: [" in out and "mean: [" in out
    train = [v for k, v in info["labels"].items() if k.startswith("ADE_train")]
    rows = {line.split()[0]: line for line in out.splitlines() if line[:3].strip().isdigit()}
    for raw in ADE20K_RAW[1:]:  # the pixel count of class raw - 1 is that of raw
        pixels = sum(int((label == raw).sum()) for label in train)
        assert f" {pixels} " in rows[str(raw - 1)], (raw, rows[str(raw - 1)])
    assert "television receiver" in out
    ignored = sum(int((label == 0).sum()) for label in train)
    ignore_line = next(line for line in out.splitlines() if "ignore 255" in line)
    assert ignore_line.split()[-1] == str(ignored)


# --------------------------------------------------------------------------- experiments

EXPERIMENTS = {  # experiment -> (dataset, num_classes)
    "cpnet_ade20k": ("ade20k", 150),
    "spnet_ade20k": ("ade20k", 150),
    "cpnet_pascal_context": ("pascal_context", 59),
    "spnet_pascal_context": ("pascal_context", 59),
    "deeplabv2_pascal_context": ("pascal_context", 60),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_composes_with_its_paper_file(name, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_config([f"experiment={name}", f"dataset.root={tmp_path}"])
    dataset, classes = EXPERIMENTS[name]
    assert cfg.dataset.name == dataset and cfg.dataset.num_classes == classes
    assert cfg.model.num_classes == classes
    if cfg.model._target_.endswith("CPNet"):  # the prior grid is the stride-8 crop
        assert [c // 8 for c in cfg.dataset.crop_size] == list(cfg.model.prior_size)
    paper = yaml.safe_load((REPO / "conf/experiment/paper" / f"{name}.yml").read_text())
    assert set(paper) <= {"rows", "other", "pending", "protocol", "deviations", "stages"}
    assert paper["pending"] or paper["deviations"]  # what is not yet the paper's is said
    for row in paper["rows"]:
        assert {"overrides", "value", "metric", "split", "table", "paper", "confirmed"} \
            <= set(row)
        for key in row["overrides"]:  # each override names a key of the composed config
            assert OmegaConf.select(cfg, key, default="absent") != "absent", key


def test_spnet_ade20k_iterations_follow_the_released_epochs():
    """tool/train.py: max_iter = epochs * len(loader); 4 GPUs, batch 16 -> 4 per GPU."""
    cfg = compose_config(["experiment=spnet_ade20k", "dataset.root=/x"])
    per_gpu = -(-20210 // 4)  # DistributedSampler pads to a multiple of the world size
    assert cfg.trainer.max_iters == 120 * (per_gpu // 4)
    cfg = compose_config(["experiment=spnet_pascal_context", "dataset.root=/x"])
    assert cfg.trainer.max_iters == 120 * (-(-4998 // 4) // 4)
    assert cfg.dataset.crop_size == [480, 480] and cfg.optim.lr == 0.01
