"""scripts/readme_numbers.py runs a demo command through the CLI and reports the run's own
metrics as the README's Markdown."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO, TINY

sys.path.insert(0, str(REPO / "scripts"))
import readme_numbers  # noqa: E402


def test_a_demo_run_is_reported_from_its_metrics(tmp_path):
    result = readme_numbers.run_demo(TINY, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["miou"] == metrics["miou"] and result["pixel_acc"] == metrics["pixel_acc"]
    assert result["iterations"] == 6 and result["seconds"] > 0
    text = readme_numbers.markdown([result], 1.0, 2.0)
    # in percent, as every table prints scores (metrics.json keeps the fraction)
    assert f"| {100 * metrics['miou']:.2f} | {100 * metrics['pixel_acc']:.2f} |" in text
    assert "6 iterations of batch 2 at 32x32" in text and "load average 1.0 before" in text
