"""One score convention wherever a user reads a score: the per-class table's percent with two
decimals (as the papers print them) in the final line, evaluate's summary and the scripts'
tables, while metrics.json keeps the fraction."""

from __future__ import annotations

import json
import logging
import re

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segtrain.app import train
from segtrain.evaluate import evaluate
from tests.conftest import CONF_DIR
from tests.test_datasets import load_script


def test_a_score_reads_the_same_in_the_table_the_final_line_evaluate_and_the_report(
        tiny_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = tiny_cfg("trainer.max_iters=2", "trainer.eval_interval=2")
    with caplog.at_level(logging.INFO, logger="segtrain"):
        train(cfg, run)
    # what python -m segtrain writes beside (segtrain.run_start), which the report reads
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    text = caplog.text
    # the table of the evaluation at iteration 2 (percent, two decimals)
    table = re.search(r"^miou\s+(\S+)$", text, re.M).group(1)
    acc = re.search(r"^pixel_acc\s+(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"\d+\.\d\d", table), table
    final = next(line for line in text.splitlines() if "final:" in line)
    assert f"mIoU {table} " in final and f"pixel acc {acc} " in final, (final, table)
    # metrics.json keeps the fraction that the table shows in percent
    stored = json.loads((run / "metrics.json").read_text())["miou"]
    assert 0 <= stored <= 1 and f"{stored:.6f}".startswith("0.")

    caplog.clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"run={run}", "num_workers=0",
                                                         "device=cpu"])
    with caplog.at_level(logging.INFO, logger="segtrain"):
        evaluate(cfg, "whole")
    summary = next(line for line in caplog.text.splitlines() if "eval=whole:" in line)
    assert f"miou {table} " in summary, (summary, table)

    report = load_script("run_report").report([run], ["run"])
    assert f"| {table} | {acc} |" in report, report
