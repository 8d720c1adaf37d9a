"""scripts/ablation_table.py on a real two-run sweep through Hydra's basic launcher: the
experiment named in the runs' overrides finds its paper file, rows match by override, and
failed or unfinished runs show as such."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import yaml

from segtrain.eval.metrics import SUMMARY_METRICS
from tests.cli_in_process import run_module
from tests.conftest import CONF_DIR, REPO, TINY

sys.path.insert(0, str(REPO / "scripts"))
import ablation_table  # noqa: E402

PAPER = {"rows": [
    {"overrides": {"lr": "poly"}, "value": 63.42, "metric": "miou", "table": "Table 2",
     "paper": "Chen et al., TPAMI 2017", "confirmed": "test"},
    {"overrides": {"lr": "step"}, "value": 62.25, "metric": "miou", "table": "Table 2",
     "paper": "Chen et al., TPAMI 2017", "confirmed": "test"},
    {"overrides": {"lr": "poly"}, "value": 90.0, "metric": "pixel_acc", "table": "Table 9",
     "paper": "Someone", "confirmed": "test"},
    {"overrides": {"lr": "cosine"}, "value": 50.0, "metric": "miou", "table": "Table 2",
     "paper": "Chen et al., TPAMI 2017", "confirmed": "test"},
]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """``python -m segtrain -m experiment=unet lr=poly,step`` with tiny settings."""
    root = tmp_path_factory.mktemp("sweep")
    args = ["-m", "experiment=unet", "lr=poly,step",
            *TINY, "model.base_channels=4", "trainer.global_batch_size=2",
            f"hydra.sweep.dir={root / 'multirun'}",
            # the default subdir (all overrides) would exceed the 255-byte file-name limit
            "hydra.sweep.subdir=${hydra.job.num}"]
    proc = run_module("segtrain", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "multirun"


def _paper_dir(tmp_path: Path) -> Path:
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "unet.yml").write_text(yaml.safe_dump(PAPER))
    return tmp_path / "paper"


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_table_of_a_real_sweep(sweep, tmp_path):
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2
    assert ablation_table.main([str(sweep), "--paper-dir", str(_paper_dir(tmp_path))]) == 0
    rows = _rows((sweep / "ablation_table.csv").read_text())
    assert (sweep / "ablation_table.md").read_text().startswith("| run | lr | status |")
    by_lr = {r["lr"]: r for r in rows if r["status"] == "ok"}
    assert set(by_lr) == {"poly", "step"}
    for lr, paper in (("poly", 63.42), ("step", 62.25)):
        run = sweep / ("0" if lr == "poly" else "1")
        ours = 100 * json.loads((run / "metrics.json").read_text())["miou"]
        row = by_lr[lr]
        assert float(row["mIoU"]) == pytest.approx(ours, abs=0.005)
        assert float(row["paper mIoU"]) == paper
        assert float(row["diff mIoU"]) == pytest.approx(ours - paper, abs=0.011)
    # a metric only one row reports gets its columns, empty where the paper has no number
    assert float(by_lr["poly"]["paper pixel acc"]) == 90.0
    assert by_lr["step"]["paper pixel acc"] == "" and by_lr["step"]["pixel acc"] != ""
    assert "Chen et al., TPAMI 2017, Table 2" in by_lr["step"]["paper source"]
    # the paper row no run reproduces is listed, not dropped
    missing = [r for r in rows if r["status"] == "not run"]
    assert [(r["run"], r["paper mIoU"]) for r in missing] == [("lr=cosine", "50.00")]


def test_failed_and_unfinished_runs_show_as_such(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    poly, step = sorted(p for p in copy.iterdir() if p.is_dir())
    (poly / "metrics.json").unlink()  # crashed before its first evaluation
    bad = copy / "2"
    shutil.copytree(step, bad)
    metrics = json.loads((step / "metrics.json").read_text())
    metrics["iteration"] = 3  # an evaluation before trainer.max_iters=6: stopped early
    (step / "metrics.json").write_text(json.dumps(metrics))
    flagged = {**metrics, "iteration": 6, "finished": False}  # i9's explicit marker
    (bad / "metrics.json").write_text(json.dumps(flagged))
    # Hydra folders of segtrain.evaluate inside a run are not runs of the sweep
    (poly / "eval" / "x_msc" / ".hydra").mkdir(parents=True)
    shutil.copy(step / ".hydra" / "overrides.yaml", poly / "eval" / "x_msc" / ".hydra")
    header, rows = ablation_table.table(ablation_table.collect(copy), _paper_dir(tmp_path))
    assert len([r for r in rows if r[header.index("status")] != "not run"]) == 3
    status = {r[0]: r[header.index("status")] for r in rows}
    assert status[poly.name] == "failed (no metrics.json)"
    assert status[step.name] == "unfinished (iteration 3 of 6)"
    assert status[bad.name] == "unfinished (iteration 6 of 6)"
    assert rows[0][header.index("mIoU")] == "n/a"


def test_every_paper_file_names_an_experiment_and_confirms_its_rows():
    paper_dir = CONF_DIR / "experiment" / "paper"
    for path in paper_dir.glob("*.yml"):
        data = yaml.safe_load(path.read_text())
        for row in data.get("rows") or []:
            assert {"overrides", "value", "metric", "table", "paper", "confirmed"} <= set(row), \
                f"{path.name}: {row}"
            assert row["metric"] in SUMMARY_METRICS, path.name
            assert 0 < float(row["value"]) <= 100, path.name
    # every paper file belongs to an experiment config
    experiments = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert {p.stem for p in paper_dir.glob("*.yml")} <= experiments
    # every paper protocol has its file; camvid_* are our own CPU-budget runs, no paper's
    papers = {e for e in experiments if not e.startswith("camvid_")}
    assert papers <= {p.stem for p in paper_dir.glob("*.yml")}


# -- fabricated run folders: seeds, settings from the config, evaluations, paper order ------
def fake_run(root: Path, name: str, overrides: list[str], miou: float | None,
             config: dict | None = None, choices: dict | None = None) -> Path:
    """A run folder as Hydra and the trainer leave it (overrides, hydra.yaml, config)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"experiment": "demo", "hydra/launcher": "basic",
                                           **(choices or {})}}}}))
    config = {"trainer": {"max_iters": 10}, **(config or {})}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if miou is not None:
        (run / "metrics.json").write_text(json.dumps(
            {"iteration": 10, "finished": True, "miou": miou, "pixel_acc": 0.9}))
    return run


def _demo_paper(tmp_path: Path, rows: list[dict]) -> Path:
    folder = tmp_path / "paper"
    folder.mkdir(exist_ok=True)
    base = {"metric": "miou", "table": "Table 2", "paper": "P", "confirmed": "test"}
    (folder / "demo.yml").write_text(yaml.safe_dump({"rows": [{**base, **r} for r in rows]}))
    return folder


def test_seed_sweep_is_aggregated_with_its_spread(tmp_path):
    sweep = tmp_path / "sweep"
    mious = {"poly": [0.50, 0.52, 0.54], "step": [0.47, 0.48, 0.52]}
    n = 0
    for lr, values in mious.items():
        for seed, miou in enumerate(values):
            fake_run(sweep, str(n), ["experiment=demo", f"lr={lr}", f"seed={seed}"], miou)
            n += 1
    fake_run(sweep, str(n), ["experiment=demo", "lr=step", "seed=3"], None)  # crashed
    paper = _demo_paper(tmp_path, [{"overrides": {"lr": "step"}, "value": 62.25},
                                   {"overrides": {"lr": "poly"}, "value": 63.42}])
    assert ablation_table.main([str(sweep), "--paper-dir", str(paper)]) == 0
    rows = _rows((sweep / "ablation_table.csv").read_text())
    # one line per setting, in the paper's order (step is its first row)
    assert [r["lr"] for r in rows] == ["step", "poly"]
    step, poly = rows
    assert step["status"] == "ok 3 of 4" and poly["status"] == "ok"
    assert step["mIoU n"] == "3" and poly["mIoU n"] == "3"
    assert poly["mIoU (mean ± std)"] == "52.00 ± 2.00"
    step_std = float(np.std([47, 48, 52], ddof=1))
    assert step["mIoU (mean ± std)"] == f"49.00 ± {step_std:.2f}"
    assert poly["diff mIoU"] == f"{52 - 63.42:+.2f} ± 2.00"
    text = (sweep / "ablation_table.md").read_text()
    se = np.sqrt(2.0 ** 2 / 3 + step_std ** 2 / 3)
    assert f"mIoU: lr=poly minus lr=step = +3.00 ± {se:.2f} (standard error), n = 3 and 3" in text
    # the 95% intervals from the seeds: Student's t with 2 degrees of freedom (its table
    # value), and for the difference Welch's, as scipy's own t-test gives it
    half = 4.302652729911275 * 2.0 / np.sqrt(3)
    assert poly["diff mIoU 95% CI"] == \
        f"[{52 - half - 63.42:+.2f}, {52 + half - 63.42:+.2f}] (seeds)"
    welch = scipy.stats.ttest_ind([50, 52, 54], [47, 48, 52], equal_var=False)
    low, high = welch.confidence_interval(0.95)
    assert f"n = 3 and 3, 95% CI [{low:+.2f}, {high:+.2f}] (Welch t over seeds)" in text


def test_intervals_from_per_image_counts(tmp_path):
    """Runs with per_image.npz (eval.save_per_image): the paired image bootstrap of
    scripts/compare_runs.py. Identical images make every resample the same: the interval is
    the one value, by hand; B's two kinds of image make it a real interval."""
    from segtrain.eval import per_image

    sweep = tmp_path / "sweep"
    names = ["background", "thing"]

    def run(name: str, lr: str, miou: float, inter: list[list[int]], union: list[list[int]]):
        folder = fake_run(sweep, name, ["experiment=demo", f"lr={lr}"], miou)
        ids = [f"img{i}" for i in range(len(inter))]
        per_image.save({"ids": ids, "intersection": np.array(inter),
                        "union": np.array(union)}, names, folder / "per_image.npz")

    # poly: every image IoU 0.8 and 0.5 (mIoU 0.65); step: 0.6 and 0.5 (0.55)
    run("0", "poly", 0.65, [[8, 3]] * 6, [[10, 6]] * 6)
    run("1", "step", 0.55, [[6, 3]] * 6, [[10, 6]] * 6)
    paper = _demo_paper(tmp_path, [{"overrides": {"lr": "poly"}, "value": 63.42},
                                   {"overrides": {"lr": "step"}, "value": 62.25}])
    assert ablation_table.main([str(sweep), "--paper-dir", str(paper)]) == 0
    rows = {r["lr"]: r for r in _rows((sweep / "ablation_table.csv").read_text())}
    assert rows["poly"]["diff mIoU 95% CI"] == "[+1.58, +1.58] (images)"  # 65 - 63.42
    assert rows["step"]["diff mIoU 95% CI"] == "[-7.25, -7.25] (images)"  # 55 - 62.25
    text = (sweep / "ablation_table.md").read_text()
    assert ("mIoU: lr=poly minus lr=step = +10.00 (one run each: no spread), n = 1 and 1, "
            "95% CI [+10.00, +10.00] (paired bootstrap over images)") in text

    shutil.rmtree(sweep / "1")  # step: half its images now score 0.2 on the thing class
    run("1", "step", (0.6 + 12 / 33) / 2, [[6, 3], [6, 1]] * 3, [[10, 6], [10, 5]] * 3)
    assert ablation_table.main([str(sweep), "--paper-dir", str(paper)]) == 0
    line = next(x for x in (sweep / "ablation_table.md").read_text().splitlines()
                if "lr=poly minus lr=step" in x)
    low, high = (float(v) for v in line.split("CI [")[1].split("]")[0].split(", "))
    point = float(line.split(" = ")[1].split(" ")[0])
    assert point == pytest.approx(100 * (0.65 - (0.6 + 12 / 33) / 2), abs=0.005)
    assert 0 < low < point < high  # poly is better on every resample


def test_rows_match_the_config_and_each_evaluation_of_a_run(tmp_path):
    sweep = tmp_path / "sweep"
    # the experiment sets the backbone: the run's overrides do not name it
    config = {"model": {"backbone": "resnet101", "separable": False, "output_stride": 16},
              "eval": {"output_stride": None, "predictor": {"scales": [1.0], "flip": False},
                       "crf": None}}
    run = fake_run(sweep, "0", ["experiment=demo"], 0.70, config, {"eval": "whole"})
    msc = {"output_stride": 8, "crf": None,
           "predictor": {"scales": [0.5, 0.75, 1.0], "flip": True, "fusion": "mean"}}
    (run / "eval_msc_flip_os8.json").write_text(json.dumps(
        {"eval": "msc_flip", "name": "msc_flip_os8", "eval_config": msc, "miou": 0.75,
         "overrides": {"eval.output_stride": "8"}}))
    (run / "eval_whole.json").write_text(json.dumps(
        {"eval": "whole", "name": "whole", "eval_config": config["eval"], "miou": 0.71,
         "overrides": {}}))
    paper = _demo_paper(tmp_path, [
        {"overrides": {"model.backbone": "resnet101", "model.separable": False}, "value": 78.85},
        {"overrides": {"model.backbone": "resnet101", "model.separable": False,
                       "eval": "msc_flip", "eval.output_stride": 8}, "value": 80.57},
        {"overrides": {"model.backbone": "xception65"}, "value": 79.79, "name": "X65"},
    ])
    header, rows = ablation_table.table(ablation_table.collect(sweep), paper)
    col = {h: i for i, h in enumerate(header)}
    got = {r[0]: (r[col["status"]], r[col["mIoU"]], r[col["paper mIoU"]]) for r in rows}
    assert got["0"] == ("ok", "70.00", "78.85")
    assert got["0/eval_whole"] == ("ok (segtrain.evaluate)", "71.00", "78.85")
    assert got["0/eval_msc_flip_os8"] == ("ok (segtrain.evaluate)", "75.00", "80.57")
    assert got["X65"] == ("not run", "", "79.79")  # a row of another backbone: not ours


def test_columns_put_before_and_after_crf_side_by_side(tmp_path):
    sweep = tmp_path / "sweep"
    values = {("largefov", "whole"): 0.60, ("largefov", "crf_v1"): 0.64,
              ("aspp_l", "whole"): 0.62, ("aspp_l", "crf_v1"): 0.66}
    for n, ((head, ev), miou) in enumerate(values.items()):
        fake_run(sweep, str(n), ["experiment=demo", f"model.head={head}", f"eval={ev}"], miou)
    paper = _demo_paper(tmp_path, [
        {"overrides": {"model.head": "largefov"}, "value": 65.76},
        {"overrides": {"model.head": "largefov", "eval": "crf_v1"}, "value": 69.84},
        {"overrides": {"model.head": "aspp_l"}, "value": 68.96},
        {"overrides": {"model.head": "aspp_l", "eval": "crf_v1"}, "value": 71.57}])
    header, rows = ablation_table.table(ablation_table.collect(sweep), paper, columns="eval")
    assert header[:3] == ["setting", "model.head", "status"]
    col = {h: i for i, h in enumerate(header)}
    assert len(rows) == 2 and [r[1] for r in rows] == ["largefov", "aspp_l"]
    largefov = rows[0]
    assert largefov[col["eval=whole: mIoU"]] == "60.00"
    assert largefov[col["eval=whole: paper mIoU"]] == "65.76"
    assert largefov[col["eval=crf_v1: mIoU"]] == "64.00"
    assert largefov[col["eval=crf_v1: paper mIoU"]] == "69.84"
    assert largefov[col["eval=crf_v1: diff mIoU"]] == "-5.84"
