"""scripts/inference_table.py on a fabricated run with one eval_*.json per inference setting,
and the names segtrain.evaluate gives those files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tests.conftest import CONF_DIR, REPO

sys.path.insert(0, str(REPO / "scripts"))
import inference_table  # noqa: E402

from segtrain.evaluate import eval_overrides, output_name  # noqa: E402


def _eval(run: Path, name: str, miou: float, scales=(0.5,), flip=False, crf=False, os=None):
    config = {"output_stride": os, "crf": {"bi_w": 4} if crf else None,
              "predictor": {"scales": list(scales), "flip": flip}}
    (run / f"eval_{name}.json").write_text(json.dumps(
        {"eval": name, "name": name, "eval_config": config, "miou": miou, "split": "val",
         "num_images": 101}))


def test_inference_ablation_of_a_run(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"model": {"output_stride": 16}}))
    msc = (0.25, 0.375, 0.5)
    _eval(run, "msc_crf_searched", 0.560, msc, crf=True)
    _eval(run, "whole", 0.531)
    _eval(run, "whole_os8", 0.540, os=8)
    _eval(run, "msc", 0.545, msc)
    _eval(run, "msc_flip", 0.550, msc, flip=True)
    _eval(run, "msc_crf", 0.552, msc, crf=True)
    (run / "eval_notes.json").write_text("{}")  # not an evaluation: skipped
    assert inference_table.main([str(run)]) == 0
    lines = (run / "inference_table.md").read_text().splitlines()
    body = [line.split(" | ") for line in lines[2:] if line.startswith("| ")]
    got = [(b[0].lstrip("| "), b[1], b[2], b[3], b[4]) for b in body]
    # OS 16 first, then MS, flip, CRF (two CRF settings, by name); OS 8 last
    assert got == [
        ("OS 16", "eval_whole.json", "53.10", "base", ""),
        ("OS 16 + MS", "eval_msc.json", "54.50", "+ MS", "+1.40"),
        ("OS 16 + MS + flip", "eval_msc_flip.json", "55.00", "+ flip", "+0.50"),
        ("OS 16 + MS + CRF", "eval_msc_crf.json", "55.20", "+ CRF", "+0.70"),
        ("OS 16 + MS + CRF", "eval_msc_crf_searched.json", "56.00", "+ CRF", "+1.50"),
        ("OS 8", "eval_whole_os8.json", "54.00", "OS 16 -> 8", "+0.90"),
    ]
    papers = {b[3]: b[5] for b in body}
    # the steps of the repo's DeepLab paper files: v3 Table 6 OS 8 (78.51 - 77.21), MS
    # (79.45 - 78.51) and flip (79.77 - 79.45); v2 TABLE 3 LargeFOV CRF (69.84 - 65.76)
    assert "+1.30 (deeplabv3_voc: OS 16 -> OS 8; Table 6" in papers["OS 16 -> 8"]
    assert "+0.94 (deeplabv3_voc: OS 8 -> OS 8 + MS; Table 6)" in papers["+ MS"]
    assert "+0.32 (deeplabv3_voc" in papers["+ flip"]
    assert "+4.08 (deeplabv2_aspp_ablation: LargeFOV -> LargeFOV + CRF;" in papers["+ CRF"]
    assert "+5.39 (deeplabv1_voc: LargeFOV -> LargeFOV + CRF;" in papers["+ CRF"]
    assert lines[-1] == "101 val images"


def test_evaluate_names_its_outputs_by_option_and_output_stride(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        plain = compose("evaluate", overrides=[f"run={tmp_path}", "eval=msc"])
        os8 = compose("evaluate", overrides=[f"run={tmp_path}", "eval=msc",
                                             "eval.output_stride=8"])
        named = compose("evaluate", overrides=[f"run={tmp_path}", "eval=msc_crf",
                                               "name=msc_crf_searched", "eval.crf.bi_w=5"])
    assert output_name(plain, "msc") == "msc"
    assert output_name(os8, "msc") == "msc_os8"
    assert output_name(named, "msc_crf") == "msc_crf_searched"
    assert eval_overrides([f"run={tmp_path}", "eval=msc_crf", "eval.crf.bi_w=5",
                           "+eval.predictor.fusion=mean", "name=x"]) == \
        {"eval.crf.bi_w": "5", "eval.predictor.fusion": "mean"}


def test_crf_search_takes_eval_overrides_only():
    import crf_search
    import pytest

    args = crf_search.parse_args(["run=x", "eval.predictor.scales=[0.25,0.375,0.5]"])
    assert args.run == "x" and args.overrides == ["eval.predictor.scales=[0.25,0.375,0.5]"]
    with pytest.raises(SystemExit):
        crf_search.parse_args(["run=x", "model.backbone=resnet101"])
